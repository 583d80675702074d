use std::sync::Arc; use std::net::SocketAddr; use crate::transport::*;
pub struct TlsIdentity;
impl TlsIdentity { pub fn load_or_create(_d: &std::path::Path) -> std::io::Result<TlsIdentity> { todo!() } }
#[derive(Default)] pub struct QuicConfig;
pub struct QuicTransport;
impl QuicTransport {
 pub async fn bind(_a: SocketAddr, _i: TlsIdentity, _s: Vec<u8>, _svc: Arc<dyn Service>, _c: QuicConfig) -> Result<Arc<QuicTransport>, TransportError> { todo!() }
 pub fn local_addr(&self) -> SocketAddr { todo!() }
 pub async fn close(&self) {}
}
impl Transport for QuicTransport { fn call(&self, _to: &str, _f: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> { todo!() } }
