//! Quorum accounting for one request, pure: how many replicas answered, how many succeeded,
//! whether the request can still reach its quorum. (`W + R > N` gives read-your-writes.)

/// The tally of one quorum request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Quorum {
    need: usize,
    total: usize,
    ok: usize,
    failed: usize,
}

/// Where a quorum request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Enough successes.
    Reached,
    /// Not enough replicas left to reach it.
    Impossible,
    /// Still waiting.
    Pending,
}

impl Quorum {
    /// `need` successes out of `total` replicas asked.
    pub(crate) fn new(need: usize, total: usize) -> Self {
        Quorum {
            need,
            total,
            ok: 0,
            failed: 0,
        }
    }

    pub(crate) fn record(&mut self, success: bool) -> Outcome {
        if success {
            self.ok += 1;
        } else {
            self.failed += 1;
        }
        self.outcome()
    }

    pub(crate) fn outcome(&self) -> Outcome {
        if self.ok >= self.need {
            Outcome::Reached
        } else if self.total - self.failed < self.need {
            Outcome::Impossible
        } else {
            Outcome::Pending
        }
    }

    pub(crate) fn ok(&self) -> usize {
        self.ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        // (need, total, replies in order, outcome after each)
        let cases: &[(usize, usize, &[bool], &[Outcome])] = &[
            (2, 3, &[true, true], &[Outcome::Pending, Outcome::Reached]),
            (
                2,
                3,
                &[false, true, true],
                &[Outcome::Pending, Outcome::Pending, Outcome::Reached],
            ),
            (
                2,
                3,
                &[false, false],
                &[Outcome::Pending, Outcome::Impossible],
            ),
            (1, 3, &[true], &[Outcome::Reached]),
            (
                3,
                3,
                &[true, true, false],
                &[Outcome::Pending, Outcome::Pending, Outcome::Impossible],
            ),
            (2, 1, &[true], &[Outcome::Impossible]),
        ];
        for (need, total, replies, outcomes) in cases {
            let mut q = Quorum::new(*need, *total);
            for (r, o) in replies.iter().zip(outcomes.iter()) {
                assert_eq!(q.record(*r), *o, "need {need} of {total}");
            }
        }
    }
}
