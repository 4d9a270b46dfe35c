//! The CLI's side of the local socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Errors reaching the local daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the shoal daemon at {path}: is `shoal agent` running?")]
    Unreachable { path: PathBuf },
}

/// A channel to the daemon's Unix socket; fails at once if nothing listens there.
pub async fn connect_local(socket: &Path) -> Result<Channel, ClientError> {
    let path = socket.to_path_buf();
    let unreachable = || ClientError::Unreachable { path: path.clone() };
    // The URI is required by tonic but unused: the connector ignores it.
    let endpoint = Endpoint::try_from("http://[::1]:1").map_err(|_| unreachable())?;
    let p = path.clone();
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .map_err(|_| unreachable())
}
