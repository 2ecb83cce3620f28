//! Pull and push over the OCI distribution API, with retries, into and out of the blob store.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt as _, TryStreamExt as _};
use kiln_cas::{BlobStore, CasError};
use kiln_telemetry::{Direction, Transfer};
use kiln_types::{Digest, ImageReference, Platform};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::auth::Credentials;
use crate::error::{ErrorKind, RegistryError, classify};
use crate::image::{
    ACCEPTED_MANIFESTS, ConfigFile, Descriptor, ManifestKind, ResolvedImage, offered_platforms, select_platform,
};
use crate::sink::{SinkError, stream_into_store};

/// How the client reaches registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Registries (`host:port`) spoken to over plain HTTP. Loopback registries always are,
    /// as Docker treats 127.0.0.0/8.
    pub insecure: Vec<String>,
    /// Credentials (from `~/.docker/config.json` by default).
    pub credentials: Credentials,
    /// Attempts for transient failures (5xx, 429, connection errors, timeouts).
    pub attempts: u32,
    /// Limit for one request or one blob transfer.
    pub timeout: Duration,
    /// Parallel layer downloads per pull.
    pub parallel_downloads: usize,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            insecure: Vec::new(),
            credentials: Credentials::default(),
            attempts: 3,
            timeout: Duration::from_secs(300),
            parallel_downloads: 4,
        }
    }
}

/// A registry client shared by every pull and push of a daemon.
#[derive(Clone)]
pub struct RegistryClient {
    https: Client,
    http: Client,
    pub(crate) web: reqwest::Client,
    pub(crate) options: Arc<RegistryOptions>,
    /// Per registry, whether it asks anonymous clients to authenticate (its `/v2/` answers
    /// with a challenge). One that does not is sent no credentials, so the OCI client does
    /// not probe `/v2/` again before every request.
    challenges: Arc<Mutex<HashMap<String, bool>>>,
    /// A repository each blob is known to be in, by registry and digest (pushed there,
    /// pulled from there): a push to another repository of the same registry mounts it
    /// from there instead of uploading it (Docker's cross-repository mount).
    sources: Arc<Mutex<HashMap<(String, Digest), String>>>,
}

/// Blob sources remembered; past that the memory starts over.
const MAX_SOURCES: usize = 100_000;

impl RegistryClient {
    /// A client with these options.
    pub fn new(options: RegistryOptions) -> Result<RegistryClient, RegistryError> {
        let build = |protocol| {
            let config = ClientConfig {
                protocol,
                use_monolithic_push: true,
                connect_timeout: Some(Duration::from_secs(10)),
                read_timeout: Some(Duration::from_secs(60)),
                user_agent: "kiln",
                ..Default::default()
            };
            Client::try_from(config)
                .map_err(|e| RegistryError::new("creating", "registry client", ErrorKind::Invalid, e.to_string()))
        };
        let web = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .user_agent("kiln")
            .build()
            .map_err(|e| RegistryError::new("creating", "HTTP client", ErrorKind::Invalid, e.to_string()))?;
        Ok(RegistryClient {
            https: build(ClientProtocol::Https)?,
            http: build(ClientProtocol::Http)?,
            web,
            options: Arc::new(options),
            challenges: Arc::default(),
            sources: Arc::default(),
        })
    }

    fn plain_http(&self, registry: &str) -> bool {
        let host = registry.rsplit_once(':').map_or(registry, |(host, _)| host);
        self.options.insecure.iter().any(|r| r == registry)
            || host == "localhost"
            || host.starts_with("127.")
            || host == "[::1]"
    }

    /// The URL scheme the registry is spoken to with.
    fn scheme(&self, registry: &str) -> &'static str {
        if self.plain_http(registry) { "http" } else { "https" }
    }

    pub(crate) async fn client_for(&self, image: &ImageReference) -> &Client {
        let client = if self.plain_http(&image.registry) { &self.http } else { &self.https };
        if !self.anonymous(&image.registry).await {
            let auth = self.options.credentials.for_registry(&image.registry);
            client.store_auth_if_needed(to_oci(image).resolve_registry(), &auth).await;
        }
        client
    }

    /// Whether requests to the registry go without credentials: none are configured for
    /// it and it does not challenge anonymous clients.
    async fn anonymous(&self, registry: &str) -> bool {
        matches!(self.options.credentials.for_registry(registry), RegistryAuth::Anonymous)
            && !self.challenges_anonymous(registry).await
    }

    /// Whether the registry challenges anonymous clients (asked once; a registry that
    /// cannot be asked is assumed to, which costs a probe per request as before).
    async fn challenges_anonymous(&self, registry: &str) -> bool {
        if let Some(known) = self.challenges.lock().expect("challenges lock").get(registry) {
            return *known;
        }
        let probe = self.web.get(format!("{}://{registry}/v2/", self.scheme(registry))).send();
        let Ok(Ok(answer)) = tokio::time::timeout(self.options.timeout, probe).await else { return true };
        let challenges = answer.headers().contains_key(http::header::WWW_AUTHENTICATE);
        self.challenges.lock().expect("challenges lock").insert(registry.to_string(), challenges);
        challenges
    }

    /// Remembers that the image's repository holds the blob.
    fn remember_source(&self, image: &ImageReference, digest: Digest) {
        let mut sources = self.sources.lock().expect("sources lock");
        if sources.len() >= MAX_SOURCES {
            sources.clear();
        }
        sources.insert((image.registry.clone(), digest), image.repository.clone());
    }

    /// Another repository of the image's registry known to hold the blob.
    fn source_for(&self, image: &ImageReference, digest: Digest) -> Option<ImageReference> {
        let sources = self.sources.lock().expect("sources lock");
        let repository = sources.get(&(image.registry.clone(), digest)).filter(|r| **r != image.repository)?;
        Some(ImageReference {
            registry: image.registry.clone(),
            repository: repository.clone(),
            tag: None,
            digest: Some(digest),
        })
    }

    /// Runs `operation` with a timeout, retrying transient failures with backoff.
    pub(crate) async fn retry<T, F, Fut>(
        &self,
        action: &str,
        image: &(dyn std::fmt::Display + Sync),
        mut operation: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let mut attempt = 1;
        loop {
            let outcome = match tokio::time::timeout(self.options.timeout, operation()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(RegistryError::new(
                    action,
                    &image.to_string(),
                    ErrorKind::Timeout,
                    format!("no answer within {:?}", self.options.timeout),
                )),
            };
            match outcome {
                Err(error) if error.kind.is_transient() && attempt < self.options.attempts => {
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    attempt += 1;
                }
                Err(mut error) if attempt > 1 => {
                    error.message = format!("{} (after {attempt} attempts)", error.message);
                    return Err(error);
                }
                other => return other,
            }
        }
    }

    /// Resolves the reference to the manifest for `platform` (picking it out of an index),
    /// and stores the manifests and the config in the blob store.
    pub async fn resolve(
        &self,
        image: &ImageReference,
        platform: &Platform,
        cas: &Arc<BlobStore>,
    ) -> Result<ResolvedImage, RegistryError> {
        let name = image.to_string();
        let (bytes, digest) = self.fetch_manifest(image, image.digest).await?;
        let manifest_kind = ManifestKind::parse(&bytes)
            .map_err(|e| RegistryError::new("parsing manifest of", &name, ErrorKind::Invalid, e.to_string()))?;
        let (index_digest, manifest_digest, manifest) = match manifest_kind {
            ManifestKind::Image(manifest) => (None, digest, manifest),
            ManifestKind::Index(index) => {
                let entry = select_platform(&index, platform).ok_or_else(|| {
                    let offered = offered_platforms(&index);
                    RegistryError::new(
                        "resolving",
                        &name,
                        ErrorKind::NotFound,
                        format!("no image for platform {platform} (the index offers: {offered})"),
                    )
                })?;
                let (child, child_digest) = self.fetch_manifest(image, Some(entry.digest)).await?;
                match ManifestKind::parse(&child) {
                    Ok(ManifestKind::Image(manifest)) => (Some(digest), child_digest, manifest),
                    _ => {
                        return Err(RegistryError::new(
                            "resolving",
                            &name,
                            ErrorKind::Invalid,
                            format!("{child_digest} is not an image manifest"),
                        ));
                    }
                }
            }
        };
        self.fetch_blob(image, &manifest.config, cas).await?;
        let config_bytes = cas.read(&manifest.config.digest).map_err(|e| cas_error("reading config of", &name, e))?;
        let config: ConfigFile = serde_json::from_slice(&config_bytes)
            .map_err(|e| RegistryError::new("parsing config of", &name, ErrorKind::Invalid, e.to_string()))?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            let message = format!("{} layers but {} diff ids", manifest.layers.len(), config.rootfs.diff_ids.len());
            return Err(RegistryError::new("resolving", &name, ErrorKind::Invalid, message));
        }
        Ok(ResolvedImage { index_digest, manifest_digest, manifest, config })
    }

    /// Resolves the image and downloads every layer not yet in the blob store, in parallel.
    pub async fn pull(
        &self,
        image: &ImageReference,
        platform: &Platform,
        cas: &Arc<BlobStore>,
    ) -> Result<ResolvedImage, RegistryError> {
        let resolved = self.resolve(image, platform, cas).await?;
        // Collected first: a closure inside the stream type trips the compiler's Send check
        // for callers that box this future.
        let fetches: Vec<_> = resolved.manifest.layers.iter().map(|layer| self.fetch_blob(image, layer, cas)).collect();
        futures_util::stream::iter(fetches)
            .buffer_unordered(self.options.parallel_downloads.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        Ok(resolved)
    }

    /// The manifest tagged `image` as it is stored, or `None` when the registry has no such
    /// tag (or repository).
    pub async fn manifest_bytes(&self, image: &ImageReference) -> Result<Option<Vec<u8>>, RegistryError> {
        match self.fetch_manifest(image, image.digest).await {
            Ok((bytes, _)) => Ok(Some(bytes)),
            Err(error) if error.kind == ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Fetches a manifest (by tag, or by `digest` when given), verifies it and stores it.
    async fn fetch_manifest(
        &self,
        image: &ImageReference,
        digest: Option<Digest>,
    ) -> Result<(Vec<u8>, Digest), RegistryError> {
        let name = image.to_string();
        let mut target = image.clone();
        if let Some(digest) = digest {
            target.digest = Some(digest);
        }
        let oci = to_oci(&target);
        let client = self.client_for(image).await;
        let anonymous = self.anonymous(&image.registry).await;
        let auth = self.options.credentials.for_registry(&image.registry);
        let bytes = self
            .retry("pulling manifest of", image, || async {
                if anonymous {
                    // The OCI client would store the (anonymous) credentials and probe `/v2/`
                    // before every later request.
                    return self.get_manifest(&target, &name).await;
                }
                client
                    .pull_manifest_raw(&oci, &auth, &ACCEPTED_MANIFESTS)
                    .await
                    .map(|(bytes, _)| bytes)
                    .map_err(|e| oci_error("pulling manifest of", &name, &e))
            })
            .await?;
        let actual = Digest::of(&bytes);
        if let Some(expected) = digest
            && expected != actual
        {
            return Err(RegistryError::new(
                "pulling manifest of",
                &name,
                ErrorKind::Integrity,
                format!("expected {expected}, got {actual}"),
            ));
        }
        Ok((bytes.to_vec(), actual))
    }

    /// A manifest from a registry that asks for no credentials, by tag or digest.
    async fn get_manifest(&self, image: &ImageReference, name: &str) -> Result<Bytes, RegistryError> {
        let action = "pulling manifest of";
        let reference =
            image.digest.map_or_else(|| image.tag.clone().unwrap_or_else(|| "latest".into()), |d| d.to_string());
        let (scheme, registry) = (self.scheme(&image.registry), &image.registry);
        let url = format!("{scheme}://{registry}/v2/{}/manifests/{reference}", image.repository);
        let failure = |kind, message: String| RegistryError::new(action, name, kind, message);
        let response = self
            .web
            .get(&url)
            .header(http::header::ACCEPT, ACCEPTED_MANIFESTS.join(", "))
            .send()
            .await
            .map_err(|e| failure(request_kind(&e), e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(failure(status_kind(status), format!("the registry answered {status}")));
        }
        response.bytes().await.map_err(|e| failure(request_kind(&e), format!("reading the manifest: {e}")))
    }

    /// Streams a blob into the blob store unless it is there already; digest and size are
    /// checked before it becomes visible.
    pub async fn fetch_blob(
        &self,
        image: &ImageReference,
        blob: &Descriptor,
        cas: &Arc<BlobStore>,
    ) -> Result<(), RegistryError> {
        if cas.contains(&blob.digest) {
            return Ok(());
        }
        let name = image.to_string();
        let action = format!("pulling blob {} of", blob.digest);
        let client = self.client_for(image).await;
        let oci = to_oci(image);
        self.retry(&action, image, || async {
            let digest = blob.digest.to_string();
            let stream =
                client.pull_blob_stream(&oci, digest.as_str()).await.map_err(|e| oci_error(&action, &name, &e))?;
            match stream_into_store(stream.stream, cas, Some(blob.digest), Some(blob.size)).await {
                Ok(_) => {
                    self.remember_source(image, blob.digest);
                    // Every blob pulled: base images' and registry caches' alike.
                    kiln_telemetry::metrics().transferred(Transfer::Registry, Direction::In, blob.size);
                    Ok(())
                }
                Err(SinkError::Body(e)) => Err(RegistryError::new(&action, &name, ErrorKind::Network, e)),
                Err(SinkError::Task(e)) => Err(RegistryError::new(&action, &name, ErrorKind::Invalid, e)),
                Err(SinkError::Store(e)) => Err(cas_error(&action, &name, e)),
            }
        })
        .await
    }

    /// Pushes the manifest or index `digest` (already in the blob store) with everything it
    /// references, then tags it as `image`. Blobs the registry has are not sent again.
    pub async fn push(
        &self,
        image: &ImageReference,
        digest: &Digest,
        cas: &Arc<BlobStore>,
    ) -> Result<(), RegistryError> {
        let name = image.to_string();
        let bytes = cas.read(digest).map_err(|e| cas_error("pushing", &name, e))?;
        match ManifestKind::parse(&bytes)
            .map_err(|e| RegistryError::new("pushing", &name, ErrorKind::Invalid, e.to_string()))?
        {
            ManifestKind::Image(manifest) => {
                for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
                    self.push_blob(image, blob, cas).await?;
                }
            }
            ManifestKind::Index(index) => {
                for child in &index.manifests {
                    Box::pin(self.push_untagged(image, child, cas)).await?;
                }
            }
        }
        self.push_manifest(image, &bytes).await
    }

    async fn push_untagged(
        &self,
        image: &ImageReference,
        child: &Descriptor,
        cas: &Arc<BlobStore>,
    ) -> Result<(), RegistryError> {
        let mut by_digest = image.clone();
        by_digest.tag = None;
        by_digest.digest = Some(child.digest);
        self.push(&by_digest, &child.digest, cas).await
    }

    /// Pushes manifest bytes (their `mediaType` is the content type) as `image`; the blobs they
    /// reference must be in the repository already.
    pub async fn push_manifest(&self, image: &ImageReference, bytes: &[u8]) -> Result<(), RegistryError> {
        let name = image.to_string();
        let media_type = serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|v| v.get("mediaType").and_then(|m| m.as_str()).map(str::to_string))
            .ok_or_else(|| {
                RegistryError::new("pushing manifest", &name, ErrorKind::Invalid, "the manifest has no mediaType")
            })?;
        let content_type = http::HeaderValue::from_str(&media_type)
            .map_err(|e| RegistryError::new("pushing manifest", &name, ErrorKind::Invalid, e.to_string()))?;
        let client = self.client_for(image).await;
        let oci = to_oci(image);
        let body = Bytes::copy_from_slice(bytes);
        self.retry("pushing manifest", image, || async {
            client
                .push_manifest_raw(&oci, body.clone(), content_type.clone())
                .await
                .map(|_| ())
                .map_err(|e| oci_error("pushing manifest", &name, &e))
        })
        .await
    }

    /// Whether the image's repository has the blob.
    pub async fn blob_exists(&self, image: &ImageReference, digest: &Digest) -> Result<bool, RegistryError> {
        let name = image.to_string();
        let action = format!("checking blob {digest} of");
        let client = self.client_for(image).await;
        let oci = to_oci(image);
        let digest = digest.to_string();
        self.retry(&action, image, || async {
            client.blob_exists(&oci, &digest).await.map_err(|e| oci_error(&action, &name, &e))
        })
        .await
    }

    /// Pushes a blob of the blob store to the image's repository unless it is there already;
    /// returns whether it was sent. A blob known to be in another repository of the registry
    /// is mounted from there, in one request.
    pub async fn push_blob(
        &self,
        image: &ImageReference,
        blob: &Descriptor,
        cas: &Arc<BlobStore>,
    ) -> Result<bool, RegistryError> {
        let name = image.to_string();
        let action = format!("pushing blob {} to", blob.digest);
        let client = self.client_for(image).await;
        let oci = to_oci(image);
        let digest = blob.digest.to_string();
        // A mount that fails (the source lost the blob, a registry that does not mount)
        // falls back to the upload.
        if let Some(source) = self.source_for(image, blob.digest)
            && client.mount_blob(&oci, &to_oci(&source), &digest).await.is_ok()
        {
            self.remember_source(image, blob.digest);
            return Ok(false);
        }
        let sent = self
            .retry(&action, image, || async {
                if client.blob_exists(&oci, &digest).await.map_err(|e| oci_error(&action, &name, &e))? {
                    return Ok(false);
                }
                let path = cas.path(&blob.digest);
                let file = tokio::fs::File::open(&path).await.map_err(|e| {
                    RegistryError::new(&action, &name, ErrorKind::Invalid, format!("{}: {e}", path.display()))
                })?;
                let stream =
                    tokio_util::io::ReaderStream::with_capacity(file, 1 << 18).map_err(OciDistributionError::IoError);
                client
                    .push_blob_stream(&oci, stream, &digest, Some(blob.size))
                    .await
                    .map(|_| true)
                    .map_err(|e| oci_error(&action, &name, &e))
            })
            .await?;
        self.remember_source(image, blob.digest);
        if sent {
            kiln_telemetry::metrics().transferred(Transfer::Registry, Direction::Out, blob.size);
        }
        Ok(sent)
    }
}

fn to_oci(image: &ImageReference) -> Reference {
    let (registry, repository) = (image.registry.clone(), image.repository.clone());
    match (&image.tag, &image.digest) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag.clone(), digest.to_string())
        }
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.to_string()),
        (Some(tag), None) => Reference::with_tag(registry, repository, tag.clone()),
        (None, None) => Reference::with_tag(registry, repository, "latest".to_string()),
    }
}

/// The kind of a failed HTTP request.
pub(crate) fn request_kind(error: &reqwest::Error) -> ErrorKind {
    if error.is_timeout() { ErrorKind::Timeout } else { ErrorKind::Network }
}

/// The kind of an HTTP error status.
pub(crate) fn status_kind(status: reqwest::StatusCode) -> ErrorKind {
    match status.as_u16() {
        401 | 403 => ErrorKind::Unauthorized,
        404 | 410 => ErrorKind::NotFound,
        429 | 500..=599 => ErrorKind::Server,
        _ => ErrorKind::Invalid,
    }
}

fn oci_error(action: &str, reference: &str, error: &OciDistributionError) -> RegistryError {
    let (kind, message) = classify(error);
    RegistryError::new(action, reference, kind, message)
}

fn cas_error(action: &str, reference: &str, error: CasError) -> RegistryError {
    let kind = match error {
        CasError::DigestMismatch { .. } | CasError::SizeMismatch { .. } => ErrorKind::Integrity,
        _ => ErrorKind::Invalid,
    };
    RegistryError::new(action, reference, kind, error.to_string())
}
