//! Malformed and oversized frames, unknown plugins and garbage bodies get a clear error frame
//! back and never take the node down.

use std::time::Duration;

use dsys_runtime::testkit::{decode_response, raw_stream};
use dsys_runtime::{
    encode, read_frame, write_frame, RpcError, RpcRequest, SysApi, SysRequest, TlsIdentity,
    WIRE_VERSION,
};
use dsys_tests::TestCluster;

async fn send_raw(
    addr: std::net::SocketAddr,
    id: &TlsIdentity,
    bytes: &[u8],
) -> anyhow::Result<RpcError> {
    let (_ep, mut send, mut recv) = raw_stream(addr, id).await?;
    send.write_all(bytes).await?;
    let _ = send.finish();
    let frame =
        tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv, 1 << 20)).await??;
    match decode_response(&frame)? {
        Ok(_) => anyhow::bail!("bad input was accepted"),
        Err(e) => Ok(e),
    }
}

fn request(plugin: &str, body: Vec<u8>) -> RpcRequest {
    RpcRequest {
        plugin: plugin.into(),
        caller: "cli".into(),
        timeout_ms: 5000,
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_unknown_are_refused() -> anyhow::Result<()> {
    let c = TestCluster::start(1).await?;
    let addr = c.node("n1").rpc_addr();
    let id = TlsIdentity::load(&c.config.cluster.certs_dir, "cli")?;

    // A length prefix of 4 GiB: refused without allocating it.
    let e = send_raw(addr, &id, &[WIRE_VERSION, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await?;
    assert!(matches!(e, RpcError::FrameTooLarge { .. }), "{e:?}");
    // 17 MiB claimed, just over the 16 MiB default.
    let e = send_raw(addr, &id, &[WIRE_VERSION, 0x01, 0x10, 0x00, 0x00]).await?;
    assert!(matches!(e, RpcError::FrameTooLarge { .. }), "{e:?}");
    // Wrong version byte.
    let e = send_raw(addr, &id, &[99, 0, 0, 0, 1, 0]).await?;
    assert!(matches!(e, RpcError::Malformed(_)), "{e:?}");
    // A well-framed body that is not a request.
    let mut buf = Vec::new();
    write_frame(
        &mut buf,
        &[0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff],
        1 << 20,
    )
    .await?;
    let e = send_raw(addr, &id, &buf).await?;
    assert!(matches!(e, RpcError::Malformed(_)), "{e:?}");
    // Unknown plugin.
    let mut buf = Vec::new();
    write_frame(
        &mut buf,
        &encode(&request("no-such-plugin", vec![]))?,
        1 << 20,
    )
    .await?;
    let e = send_raw(addr, &id, &buf).await?;
    assert_eq!(e, RpcError::UnknownPlugin("no-such-plugin".into()));
    // A real plugin with a garbage body.
    let mut buf = Vec::new();
    write_frame(
        &mut buf,
        &encode(&request("ratelimit", vec![0xff; 9]))?,
        1 << 20,
    )
    .await?;
    let e = send_raw(addr, &id, &buf).await?;
    assert!(matches!(e, RpcError::Malformed(_)), "{e:?}");
    // Claiming another identity than the certificate's.
    let mut forged = request("sys", encode(&SysRequest::Ping)?);
    forged.caller = "n1".into();
    let mut buf = Vec::new();
    write_frame(&mut buf, &encode(&forged)?, 1 << 20).await?;
    let e = send_raw(addr, &id, &buf).await?;
    assert!(matches!(e, RpcError::Unauthorized(_)), "{e:?}");

    // The node is still fine.
    c.client()?.call::<SysApi>(&SysRequest::Ping).await?;
    c.shutdown().await;
    Ok(())
}
