//! Service images: tags pinned to the registry's digest when a spec is written (so every task
//! of a service runs the same bytes, as swarm does), and registry credentials kept out of what
//! the control API returns.
//!
//! The manager has no registry client of its own: the node's agent hands it an
//! [`ImageResolver`] (the worker's OCI distribution client and the node's image store).

use std::sync::Arc;

use shoal_proto::v1 as pb;

/// What the agent's resolver says about an image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The registry's digest for it now (`sha256:…`).
    Digest(String),
    /// An image this node holds that came from no registry (imported or loaded): nothing to
    /// look up, the reference stays as given.
    LocalOnly,
}

/// Looks image references up in their registries.
#[tonic::async_trait]
pub trait ImageResolver: Send + Sync + 'static {
    /// The digest `image` (`name[:tag]`) stands for now, with `credentials` when the caller
    /// sent some; `Err` with the registry's reason when it cannot be looked up.
    async fn resolve(
        &self,
        image: &str,
        credentials: Option<&pb::RegistryCredentials>,
    ) -> Result<Resolution, String>;
}

/// A resolver as the daemon's configuration holds it.
#[derive(Clone)]
pub struct Resolver(pub Arc<dyn ImageResolver>);

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// The container spec of `spec`, if any.
fn container(spec: &mut pb::ServiceSpec) -> Option<&mut pb::ContainerSpec> {
    spec.task.as_mut().and_then(|t| t.container.as_mut())
}

/// Pins `spec`'s image to its registry digest (`name:tag@sha256:…`) unless it names one
/// already. Returns what the user should be told when it could not be (the spec then keeps
/// the tag, and each node resolves it on its own).
pub async fn pin(resolver: Option<&Resolver>, spec: &mut pb::ServiceSpec) -> Vec<String> {
    let Some(resolver) = resolver else {
        return Vec::new();
    };
    let Some(c) = container(spec) else {
        return Vec::new();
    };
    if c.image.is_empty() || c.image.contains('@') {
        return Vec::new();
    }
    match resolver.0.resolve(&c.image, c.registry_auth.as_ref()).await {
        Ok(Resolution::Digest(d)) => {
            c.image = format!("{}@{d}", c.image);
            Vec::new()
        }
        Ok(Resolution::LocalOnly) => Vec::new(),
        Err(why) => vec![format!(
            "image {} could not be accessed on a registry to record its digest ({why}); \
             each node will access {} independently, possibly leading to different nodes \
             running different versions of the image",
            c.image, c.image
        )],
    }
}

/// `spec` for a caller's eyes: registry credentials removed.
pub fn redact_spec(spec: &mut pb::ServiceSpec) {
    if let Some(c) = container(spec) {
        c.registry_auth = None;
    }
}

/// A service for a caller's eyes: no registry credentials in its specs.
pub fn redact_service(mut s: pb::Service) -> pb::Service {
    for spec in [s.spec.as_mut(), s.previous_spec.as_mut()]
        .into_iter()
        .flatten()
    {
        redact_spec(spec);
    }
    s
}

/// A task for a caller's eyes: no registry credentials in its spec.
pub fn redact_task(mut t: pb::Task) -> pb::Task {
    if let Some(c) = t.spec.as_mut().and_then(|s| s.container.as_mut()) {
        c.registry_auth = None;
    }
    t
}

/// True when `new` names the image `old` does (a pinned image sent back unchanged, or a
/// tag that was never pinned), so an update need not look it up again.
pub fn same_image(old: &pb::ServiceSpec, new: &pb::ServiceSpec) -> bool {
    let image = |s: &pb::ServiceSpec| {
        s.task
            .as_ref()
            .and_then(|t| t.container.as_ref())
            .map(|c| c.image.clone())
    };
    image(old) == image(new)
}

/// Gives `spec` the image `from` was pinned to.
pub fn take_image(spec: &mut pb::ServiceSpec, from: &pb::ServiceSpec) {
    let pinned = from
        .task
        .as_ref()
        .and_then(|t| t.container.as_ref())
        .map(|c| c.image.clone());
    if let (Some(c), Some(image)) = (container(spec), pinned) {
        c.image = image;
    }
}

/// An update that sends no credentials keeps the ones the service has (the spec it read had
/// them removed); `--with-registry-auth` replaces them.
pub fn keep_credentials(old: &pb::ServiceSpec, new: &mut pb::ServiceSpec) {
    let old_auth = old
        .task
        .as_ref()
        .and_then(|t| t.container.as_ref())
        .and_then(|c| c.registry_auth.clone());
    if let Some(c) = container(new) {
        if c.registry_auth.is_none() {
            c.registry_auth = old_auth;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<Resolution, String>);

    #[tonic::async_trait]
    impl ImageResolver for Fixed {
        async fn resolve(
            &self,
            _image: &str,
            _credentials: Option<&pb::RegistryCredentials>,
        ) -> Result<Resolution, String> {
            self.0.clone()
        }
    }

    fn spec(image: &str) -> pb::ServiceSpec {
        pb::ServiceSpec {
            task: Some(pb::TaskSpec {
                container: Some(pb::ContainerSpec {
                    image: image.into(),
                    registry_auth: Some(pb::RegistryCredentials {
                        server: "r:5000".into(),
                        username: "u".into(),
                        password: "p".into(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn image(s: &pb::ServiceSpec) -> &str {
        &s.task.as_ref().unwrap().container.as_ref().unwrap().image
    }

    #[tokio::test]
    async fn tags_are_pinned_digests_kept_and_failures_warned() {
        let d = Resolver(Arc::new(Fixed(Ok(Resolution::Digest("sha256:ab".into())))));
        let mut s = spec("r:5000/app:1");
        assert!(pin(Some(&d), &mut s).await.is_empty());
        assert_eq!(image(&s), "r:5000/app:1@sha256:ab");
        // Already pinned: left alone.
        assert!(pin(Some(&d), &mut s).await.is_empty());
        assert_eq!(image(&s), "r:5000/app:1@sha256:ab");
        let local = Resolver(Arc::new(Fixed(Ok(Resolution::LocalOnly))));
        let mut s = spec("busybox:latest");
        assert!(pin(Some(&local), &mut s).await.is_empty());
        assert_eq!(image(&s), "busybox:latest");
        let down = Resolver(Arc::new(Fixed(Err("connection refused".into()))));
        let w = pin(Some(&down), &mut s).await;
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("connection refused"), "{w:?}");
        assert_eq!(image(&s), "busybox:latest");
        assert!(pin(None, &mut s).await.is_empty());
    }

    #[test]
    fn credentials_never_leave_and_survive_updates_that_do_not_send_them() {
        let stored = spec("app");
        let svc = redact_service(pb::Service {
            spec: Some(stored.clone()),
            previous_spec: Some(stored.clone()),
            ..Default::default()
        });
        for s in [svc.spec.as_ref(), svc.previous_spec.as_ref()] {
            assert!(s
                .unwrap()
                .task
                .as_ref()
                .unwrap()
                .container
                .as_ref()
                .unwrap()
                .registry_auth
                .is_none());
        }
        let mut read_back = svc.spec.clone().unwrap();
        keep_credentials(&stored, &mut read_back);
        assert_eq!(read_back, stored);
        let mut fresh = spec("app");
        container(&mut fresh)
            .unwrap()
            .registry_auth
            .as_mut()
            .unwrap()
            .password = "new".into();
        keep_credentials(&stored, &mut fresh);
        assert_eq!(
            container(&mut fresh)
                .unwrap()
                .registry_auth
                .as_ref()
                .unwrap()
                .password,
            "new"
        );
    }
}
