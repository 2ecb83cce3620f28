//! Exporting a solved build: image documents, pushes, tarballs, plain files.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use kiln_dockerfile::BuildPlan;
use kiln_layer::{Compression, TarOptions};
use kiln_model::{BuildEvent, BuildRequest, CacheCompression, Layers, OutputSpec, PushTarget};
use kiln_registry::{
    ArchiveFormat, Descriptor, History, MediaTypes, NewImage, NewLayer, store_image, store_index, write_archive,
};
use kiln_types::{Digest, now_ms, rfc3339_millis};
use kiln_worker::Snapshot;
use tokio::sync::mpsc;

use crate::error::BuildError;
use crate::history::{self, Bases};

use crate::{Engine, SpooledFile};

impl Engine {
    /// Runs every requested output; returns the image digest when an image was made, and
    /// the files written into the request's spool.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn export(
        &self,
        plan: &BuildPlan,
        results: &[Option<Snapshot>],
        vertex_layers: &HashMap<Digest, usize>,
        bases: &Bases,
        request: &BuildRequest,
        spool: Option<&Path>,
        progress: &mpsc::UnboundedSender<BuildEvent>,
    ) -> Result<(Option<Digest>, Vec<SpooledFile>), BuildError> {
        let options = tar_options(request)?;
        let epoch = options.source_date_epoch;
        let created = rfc3339_millis(epoch.map_or_else(now_ms, |seconds| seconds * 1000));
        let empty = Snapshot::default();
        let snapshots: Vec<&Snapshot> = results.iter().map(|r| r.as_ref().unwrap_or(&empty)).collect();
        let mut images: HashMap<MediaTypes, Descriptor> = HashMap::new();
        let mut image_digest = None;
        let mut files = Vec::new();
        if let Some(spool) = spool {
            tokio::fs::create_dir_all(spool)
                .await
                .map_err(|source| BuildError::Io { path: spool.to_path_buf(), source })?;
        }
        let images_out =
            request.outputs.iter().any(|o| !matches!(o, OutputSpec::Local { .. } | OutputSpec::Tar { .. }));
        if images_out {
            self.keep_base_blobs(bases).await?;
        }
        for (index, output) in request.outputs.iter().enumerate() {
            let spooled = spool.map(|spool| spool.join(index.to_string()));
            let media = match output {
                OutputSpec::Image { media, .. } => Some(*media),
                OutputSpec::Oci { .. } => Some(MediaTypes::Oci),
                OutputSpec::Docker { .. } => Some(MediaTypes::Docker),
                _ => None,
            };
            if let Some(media) = media
                && let std::collections::hash_map::Entry::Vacant(slot) = images.entry(media)
            {
                let step = self.step(progress, "exporting layers and image config");
                let histories = histories(plan, vertex_layers, bases, &created);
                let mut layers = Vec::with_capacity(snapshots.len());
                for snapshot in &snapshots {
                    layers.push(self.image_layers(snapshot, options).await?);
                }
                slot.insert(self.store_images(plan, layers, &histories, media, &created)?);
                step.done();
            }
            match output {
                OutputSpec::Image { names, push, media } => {
                    let image = &images[media];
                    image_digest = Some(image.digest);
                    if *push {
                        for name in names {
                            let reference =
                                name.parse().map_err(|source| BuildError::OutputName { name: name.clone(), source })?;
                            let step = self.step(progress, &format!("pushing {name}"));
                            self.stores.registry().push(&reference, &image.digest, self.stores.cas()).await?;
                            step.done();
                        }
                    }
                }
                OutputSpec::Oci { dest, names } | OutputSpec::Docker { dest, names } => {
                    let (format, media) = match output {
                        OutputSpec::Oci { .. } => (ArchiveFormat::Oci, MediaTypes::Oci),
                        _ => (ArchiveFormat::Docker, MediaTypes::Docker),
                    };
                    let image = images[&media].clone();
                    image_digest = Some(image.digest);
                    let step = self.step(progress, &format!("writing {}", dest.display()));
                    let path = spooled.clone().unwrap_or_else(|| dest.clone());
                    let (cas, names) = (Arc::clone(self.stores.cas()), names.clone());
                    let written = path.clone();
                    tokio::task::spawn_blocking(move || write_archive(&written, &image, &names, &cas, format))
                        .await??;
                    files.extend(spooled.map(|path| SpooledFile { output: index, unpack_into: None, path }));
                    step.done();
                }
                OutputSpec::Local { dest } => {
                    let step = self.step(progress, &format!("copying files to {}", dest.display()));
                    for (i, snapshot) in snapshots.iter().enumerate() {
                        let subdir = if snapshots.len() == 1 { String::new() } else { platform_dir(plan, i) };
                        match &spooled {
                            // The client unpacks a tar of the files where it wants them.
                            Some(spooled) => {
                                tokio::fs::create_dir_all(spooled)
                                    .await
                                    .map_err(|source| BuildError::Io { path: spooled.clone(), source })?;
                                let path = spooled.join(format!("{i}.tar"));
                                self.stores.export_tar(snapshot, &path, options).await?;
                                files.push(SpooledFile { output: index, unpack_into: Some(subdir), path });
                            }
                            None => self.stores.export_local(snapshot, &dest.join(subdir)).await?,
                        }
                    }
                    step.done();
                }
                OutputSpec::Tar { dest } => {
                    if snapshots.len() != 1 {
                        return Err(BuildError::TarMultiPlatform);
                    }
                    let step = self.step(progress, &format!("writing {}", dest.display()));
                    let path = spooled.as_ref().unwrap_or(dest);
                    self.stores.export_tar(snapshots[0], path, options).await?;
                    files.extend(spooled.map(|path| SpooledFile { output: index, unpack_into: None, path }));
                    step.done();
                }
            }
        }
        Ok((image_digest, files))
    }

    /// Base layers are exported as the blobs they were pulled as. A worker records them when
    /// it pulls; a coordinator, whose layers arrived from workers as plain tars, pulls the
    /// base images' blobs itself (each once: the store keeps them).
    async fn keep_base_blobs(&self, bases: &Bases) -> Result<(), BuildError> {
        if self.cluster().is_none() {
            return Ok(());
        }
        for ((reference, platform), digest) in &bases.digests {
            // The manifest the build resolved, not whatever the tag names by now.
            let mut pinned = reference.clone();
            pinned.digest = Some(*digest);
            let image = self.stores.registry().pull(&pinned, platform, self.stores.cas()).await?;
            self.stores.record_origins(&image).await?;
        }
        Ok(())
    }

    /// A snapshot's layers as image layers (gzip, or the blobs they were pulled as) in this
    /// engine's blob store.
    async fn image_layers(&self, snapshot: &Snapshot, options: TarOptions) -> Result<Vec<NewLayer>, BuildError> {
        let blobs = self.stores.export_layers(snapshot, Compression::Gzip, options).await?;
        Ok(blobs
            .iter()
            .map(|b| NewLayer {
                digest: b.digest,
                diff_id: b.diff_id,
                size: b.size,
                media_type: b.compression.oci_media_type().into(),
            })
            .collect())
    }

    /// A cluster build whose outputs are all image pushes: the worker holding each result's
    /// layers pushes them straight to every named repository (the coordinator is no longer
    /// the fleet's bandwidth bottleneck); the coordinator writes the configs and manifests
    /// and pushes those, with the base layers, exported as the blobs they were pulled as
    /// from its own store. `None` when a result's layers are on no single worker or a push
    /// failed: then the coordinator brings the layers in and exports as for other outputs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn push_from_workers(
        &self,
        cluster: &kiln_cluster::Cluster<crate::ClusterData>,
        plan: &BuildPlan,
        results: &[Option<Layers>],
        vertex_layers: &HashMap<Digest, usize>,
        bases: &Bases,
        request: &BuildRequest,
        progress: &mpsc::UnboundedSender<BuildEvent>,
    ) -> Result<Option<Option<Digest>>, BuildError> {
        let options = tar_options(request)?;
        let created = rfc3339_millis(options.source_date_epoch.map_or_else(now_ms, |seconds| seconds * 1000));
        let names: Vec<&String> = request
            .outputs
            .iter()
            .flat_map(|o| match o {
                OutputSpec::Image { names, .. } => names.iter().collect(),
                _ => Vec::new(),
            })
            .collect();
        self.keep_base_blobs(bases).await?;
        let step = self.step(progress, "pushing layers from the workers holding them");
        let mut platforms = Vec::with_capacity(results.len());
        for result in results {
            let chain = result.as_ref().map(|l| l.layers.as_slice()).unwrap_or_default();
            // Base layers as pulled, from here; the rest from a worker.
            let mut here = HashMap::new();
            for layer in chain {
                let origin = self.stores.snapshots().origin(&layer.diff_id, self.stores.cas());
                if let Some(origin) = origin.map_err(kiln_worker::StoreError::from)? {
                    here.insert(layer.diff_id, origin);
                }
            }
            let theirs: Vec<Digest> = chain.iter().map(|l| l.diff_id).filter(|d| !here.contains_key(d)).collect();
            let mut pushed = HashMap::new();
            if !theirs.is_empty() {
                let Some(worker) = cluster.holder_of_all(&theirs) else { return Ok(None) };
                for name in &names {
                    let target = PushTarget::Registry((*name).clone());
                    let epoch = options.source_date_epoch;
                    match cluster.push(&worker, theirs.clone(), target, CacheCompression::Gzip, epoch).await {
                        Ok(layers) => pushed.extend(layers.into_iter().map(|l| (l.diff_id, l))),
                        Err(reason) => {
                            tracing::warn!("worker {worker} could not push to {name}: {reason}; exporting here");
                            return Ok(None);
                        }
                    }
                }
            }
            let layers = chain
                .iter()
                .map(|layer| match (here.get(&layer.diff_id), pushed.get(&layer.diff_id)) {
                    (Some(origin), _) => NewLayer {
                        digest: origin.digest,
                        diff_id: origin.diff_id,
                        size: origin.size,
                        media_type: origin.compression.oci_media_type().into(),
                    },
                    (None, Some(pushed)) => NewLayer {
                        digest: pushed.digest,
                        diff_id: pushed.diff_id,
                        size: pushed.size,
                        media_type: pushed.media_type.clone(),
                    },
                    (None, None) => unreachable!("every layer is here or was pushed"),
                })
                .collect();
            platforms.push(layers);
        }
        step.done();
        let histories = histories(plan, vertex_layers, bases, &created);
        let mut image_digest = None;
        for output in &request.outputs {
            let OutputSpec::Image { names, media, .. } = output else { continue };
            let image = self.store_images(plan, platforms.clone(), &histories, *media, &created)?;
            image_digest = Some(image.digest);
            for name in names {
                let reference = name.parse().map_err(|source| BuildError::OutputName { name: name.clone(), source })?;
                let step = self.step(progress, &format!("pushing {name}"));
                // The workers' layers are there already; the config, the manifests and the
                // base layers go from here.
                self.stores.registry().push(&reference, &image.digest, self.stores.cas()).await?;
                step.done();
            }
        }
        Ok(Some(image_digest))
    }

    /// The image of each output platform from its layers, under an index when there are
    /// several.
    fn store_images(
        &self,
        plan: &BuildPlan,
        platforms: Vec<Vec<NewLayer>>,
        histories: &[Option<Vec<History>>],
        media: MediaTypes,
        created: &str,
    ) -> Result<Descriptor, BuildError> {
        let mut manifests = Vec::new();
        for (i, layers) in platforms.into_iter().enumerate() {
            let history = histories[i].clone().unwrap_or_else(|| {
                layers
                    .iter()
                    .map(|_| History {
                        created: created.to_string(),
                        created_by: "kiln build".into(),
                        empty_layer: false,
                    })
                    .collect()
            });
            let image = NewImage {
                platform: plan.graph.outputs[i].platform.clone(),
                config: serde_json::to_value(&plan.images[i])?,
                layers,
                history,
                created: created.to_string(),
            };
            manifests.push(store_image(self.stores.cas(), &image, media)?);
        }
        if manifests.len() == 1 {
            let mut single = manifests.remove(0);
            single.platform = None;
            return Ok(single);
        }
        Ok(store_index(self.stores.cas(), manifests, media)?)
    }

    pub(crate) fn step<'a>(&self, progress: &'a mpsc::UnboundedSender<BuildEvent>, name: &str) -> ExportStep<'a> {
        let started = now_ms();
        let _ = progress.send(BuildEvent::Export { name: name.to_string(), started, completed: None });
        ExportStep { progress, name: name.to_string(), started }
    }
}

pub(crate) struct ExportStep<'a> {
    progress: &'a mpsc::UnboundedSender<BuildEvent>,
    name: String,
    started: u64,
}

impl ExportStep<'_> {
    pub(crate) fn done(self) {
        let _ = self.progress.send(BuildEvent::Export {
            name: self.name,
            started: self.started,
            completed: Some(now_ms()),
        });
    }
}

/// How layers are written for this request (`SOURCE_DATE_EPOCH` clamps their times).
pub(crate) fn tar_options(request: &BuildRequest) -> Result<TarOptions, BuildError> {
    let epoch = match request.build_args.get("SOURCE_DATE_EPOCH") {
        Some(text) => Some(text.parse::<u64>().map_err(|_| BuildError::SourceDateEpoch(text.clone()))?),
        None => None,
    };
    Ok(TarOptions { source_date_epoch: epoch })
}

/// The image history of each output platform.
fn histories(
    plan: &BuildPlan,
    vertex_layers: &HashMap<Digest, usize>,
    bases: &Bases,
    created: &str,
) -> Vec<Option<Vec<History>>> {
    plan.graph
        .outputs
        .iter()
        .map(|o| history::history(&plan.graph, o.digest, vertex_layers, &bases.histories, created))
        .collect()
}

fn platform_dir(plan: &BuildPlan, index: usize) -> String {
    plan.graph.outputs[index].platform.to_string().replace('/', "_")
}
