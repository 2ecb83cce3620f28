//! Objects in an S3 bucket (AWS or any S3-compatible server), through the AWS SDK: the only
//! module of Kiln that speaks S3. Credentials come from the standard AWS environment variables
//! and config files.

use std::path::PathBuf;
use std::sync::Arc;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use kiln_cas::BlobStore;
use kiln_registry::Descriptor;

use crate::store::{Fut, ObjectStore};

/// One bucket.
pub struct S3Objects {
    client: Client,
    bucket: String,
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
        S3Objects { client: Client::from_conf(config.build()), bucket: bucket.to_string() }
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

    fn upload(&self, key: String, file: PathBuf, _size: u64) -> Fut<'_, Result<(), String>> {
        Box::pin(async move {
            let body = ByteStream::from_path(&file).await.map_err(|e| format!("{}: {e}", file.display()))?;
            self.client.put_object().bucket(&self.bucket).key(&key).body(body).send().await.map_err(reason)?;
            Ok(())
        })
    }
}
