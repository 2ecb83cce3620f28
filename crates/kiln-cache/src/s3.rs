//! Objects in an S3 bucket (AWS or any S3-compatible server), through the AWS SDK: the only
//! module of Kiln that speaks S3. Credentials come from the standard AWS environment variables
//! and config files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use futures_util::{StreamExt as _, TryStreamExt as _};
use kiln_cas::BlobStore;
use kiln_registry::Descriptor;

use crate::store::{Fut, ObjectStore};

/// The part size of multipart uploads: S3 takes at most 5 GiB in one PUT, and parts move
/// in parallel.
pub const PART_SIZE: u64 = 256 << 20;

/// Parts of one object uploaded at once.
const PARALLEL_PARTS: usize = 4;

/// One bucket.
pub struct S3Objects {
    client: Client,
    bucket: String,
    part_size: u64,
}

impl S3Objects {
    /// A client for `bucket` in `region`, at `endpoint_url` when given (an S3-compatible
    /// server), addressing the bucket in the path when `use_path_style`.
    pub async fn connect(bucket: &str, region: &str, endpoint_url: Option<&str>, use_path_style: bool) -> S3Objects {
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .load()
            .await;
        let mut config = aws_sdk_s3::config::Builder::from(&shared).force_path_style(use_path_style);
        if let Some(url) = endpoint_url {
            config = config.endpoint_url(url);
        }
        S3Objects::new(Client::from_conf(config.build()), bucket)
    }

    /// `bucket` through a client configured by the caller.
    pub fn new(client: Client, bucket: &str) -> S3Objects {
        S3Objects { client, bucket: bucket.to_string(), part_size: PART_SIZE }
    }

    /// Objects larger than `bytes` are uploaded in parts of that size (at least 5 MiB, S3's
    /// smallest part), instead of [`PART_SIZE`].
    pub fn with_part_size(mut self, bytes: u64) -> S3Objects {
        self.part_size = bytes.max(5 << 20);
        self
    }

    /// Uploads `file` in parts; a failed upload is aborted, so no parts are left behind.
    async fn upload_parts(&self, key: &str, file: &Path, size: u64) -> Result<(), String> {
        let created =
            self.client.create_multipart_upload().bucket(&self.bucket).key(key).send().await.map_err(reason)?;
        let upload_id = created.upload_id().ok_or("the server gave no upload id")?.to_string();
        let parts = size.div_ceil(self.part_size);
        // Collected first: a closure inside the stream type trips the compiler's Send check.
        let uploads: Vec<_> = (0..parts).map(|n| self.upload_part(key, &upload_id, file, n, size)).collect();
        let sent: Result<Vec<CompletedPart>, String> =
            futures_util::stream::iter(uploads).buffered(PARALLEL_PARTS).try_collect().await;
        let completed = match sent {
            Ok(parts) => self.complete(key, &upload_id, parts, size).await,
            Err(error) => Err(error),
        };
        if completed.is_err() {
            // Best effort: the error that matters is the one above.
            let abort = self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(&upload_id);
            let _ = abort.send().await;
        }
        completed
    }

    /// Completes a multipart upload of `size` bytes from its parts.
    async fn complete(&self, key: &str, upload_id: &str, parts: Vec<CompletedPart>, size: u64) -> Result<(), String> {
        let upload = CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(upload)
            .send()
            .await;
        let error = match completed {
            Ok(_) => return Ok(()),
            Err(error) => error,
        };
        // A success whose body the SDK cannot read (moto 5 names its root element
        // differently): the object itself says whether the upload completed.
        if error.raw_response().is_some_and(|r| r.status().as_u16() == 200) {
            let head = self.client.head_object().bucket(&self.bucket).key(key).send().await;
            if head.is_ok_and(|head| head.content_length() == i64::try_from(size).ok()) {
                return Ok(());
            }
        }
        Err(reason(error))
    }

    /// Uploads part `n` (from 0) of `file`.
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        file: &Path,
        n: u64,
        size: u64,
    ) -> Result<CompletedPart, String> {
        let offset = n * self.part_size;
        let length = self.part_size.min(size - offset);
        let body = ByteStream::read_from()
            .path(file)
            .offset(offset)
            .length(Length::Exact(length))
            .build()
            .await
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let number = i32::try_from(n + 1).map_err(|_| format!("{} parts are too many", n + 1))?;
        let part = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(body)
            .send()
            .await
            .map_err(|e| format!("part {number}: {}", reason(e)))?;
        Ok(CompletedPart::builder().part_number(number).set_e_tag(part.e_tag().map(str::to_string)).build())
    }
}

fn reason(error: impl std::error::Error) -> String {
    DisplayErrorContext(error).to_string()
}

impl ObjectStore for S3Objects {
    fn get(&self, key: String, max: u64) -> Fut<'_, Result<Option<Vec<u8>>, String>> {
        Box::pin(async move {
            match self.client.get_object().bucket(&self.bucket).key(&key).send().await {
                Ok(object) if object.content_length().is_none_or(|n| n < 0 || n as u64 > max) => {
                    Err(format!("{key}: {:?} bytes, more than the {max} read", object.content_length()))
                }
                Ok(object) => {
                    let bytes = object.body.collect().await.map_err(reason)?;
                    Ok(Some(bytes.into_bytes().to_vec()))
                }
                Err(error) if error.as_service_error().is_some_and(|e| e.is_no_such_key()) => Ok(None),
                Err(error) => Err(reason(error)),
            }
        })
    }

    fn put(&self, key: String, bytes: Vec<u8>) -> Fut<'_, Result<(), String>> {
        Box::pin(async move {
            let body = ByteStream::from(bytes);
            self.client.put_object().bucket(&self.bucket).key(&key).body(body).send().await.map_err(reason)?;
            Ok(())
        })
    }

    fn exists(&self, key: String) -> Fut<'_, Result<bool, String>> {
        Box::pin(async move {
            match self.client.head_object().bucket(&self.bucket).key(&key).send().await {
                Ok(_) => Ok(true),
                Err(error) if error.as_service_error().is_some_and(|e| e.is_not_found()) => Ok(false),
                Err(error) => Err(reason(error)),
            }
        })
    }

    fn download<'a>(
        &'a self,
        key: String,
        blob: &'a Descriptor,
        cas: &'a Arc<BlobStore>,
    ) -> Fut<'a, Result<u64, String>> {
        Box::pin(async move {
            let object = self.client.get_object().bucket(&self.bucket).key(&key).send().await.map_err(reason)?;
            let (sender, writer) = kiln_cas::blob_writer(Arc::clone(cas), blob.digest);
            let mut body = object.body;
            let mut received = 0u64;
            let mut broken = None;
            loop {
                match body.try_next().await {
                    Ok(Some(chunk)) => {
                        received += chunk.len() as u64;
                        if received > blob.size || sender.send(chunk.to_vec()).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        broken = Some(reason(error));
                        break;
                    }
                }
            }
            drop(sender);
            let stored = writer.await.map_err(|e| e.to_string())?;
            if let Some(broken) = broken {
                return Err(broken);
            }
            stored.map(|info| info.size).map_err(|e| e.to_string())
        })
    }

    fn upload(&self, key: String, file: PathBuf, size: u64) -> Fut<'_, Result<(), String>> {
        Box::pin(async move {
            if size > self.part_size {
                return self.upload_parts(&key, &file, size).await;
            }
            let body = ByteStream::from_path(&file).await.map_err(|e| format!("{}: {e}", file.display()))?;
            self.client.put_object().bucket(&self.bucket).key(&key).body(body).send().await.map_err(reason)?;
            Ok(())
        })
    }
}
