//! Writing the file outputs a daemon streams back (`type=local`, `tar`, `oci`, `docker`) at
//! the paths the user gave, on a thread of their own so the progress display never waits on
//! the disk. A `type=local` result arrives as a tar and is unpacked with every entry confined
//! to the destination; a file output is written beside its destination and renamed into
//! place once complete, so a failed build never leaves half a tarball under the final name.

use std::collections::HashMap;
use std::io::{Seek as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use kiln_model::OutputSpec;
use tokio::sync::mpsc;

/// One piece of a file output, as it arrived.
pub struct Piece {
    /// The output's index among the request's outputs.
    pub output: usize,
    /// `Some(subdir)`: a tar to unpack into `dest/subdir`; `None`: the file at `dest`.
    pub unpack_into: Option<String>,
    /// The bytes.
    pub data: Vec<u8>,
    /// The file's last piece.
    pub last: bool,
}

/// The writer thread: pieces go in, and [`ExportWriter::finish`] says whether every file
/// was written.
pub struct ExportWriter {
    pieces: mpsc::Sender<Piece>,
    thread: std::thread::JoinHandle<anyhow::Result<usize>>,
}

impl ExportWriter {
    /// A writer for the destinations of `outputs` (the `--output` specs as sent, with
    /// absolute `dest=` paths).
    pub fn start(outputs: &[OutputSpec]) -> anyhow::Result<ExportWriter> {
        let dests: Vec<Option<PathBuf>> = outputs.iter().map(|o| o.dest().map(Path::to_path_buf)).collect();
        let (pieces, mut received) = mpsc::channel::<Piece>(16);
        let thread = std::thread::Builder::new()
            .name("kiln-exports".into())
            .spawn(move || {
                let mut files = Files { dests, open: HashMap::new(), written: 0 };
                // After a failure the remaining pieces are drained so the build stream flows.
                let mut failure = None;
                while let Some(piece) = received.blocking_recv() {
                    if failure.is_none()
                        && let Err(error) = files.piece(piece)
                    {
                        failure = Some(error);
                    }
                }
                match failure {
                    Some(error) => Err(error),
                    None if files.open.is_empty() => Ok(files.written),
                    None => bail!("the daemon ended before sending every output file"),
                }
            })
            .context("starting the thread that writes the build's files")?;
        Ok(ExportWriter { pieces, thread })
    }

    /// Hands a piece to the writer thread.
    pub async fn send(&self, piece: Piece) {
        // A closed channel means the thread ended; `finish` reports why.
        let _ = self.pieces.send(piece).await;
    }

    /// Waits for the writer; returns how many files it completed.
    pub async fn finish(self) -> anyhow::Result<usize> {
        drop(self.pieces);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the export writer thread panicked"))?
    }
}

/// The `dest=` of a spec (a bare path is `type=local,dest=PATH`), or `None` for outputs
/// without files.
struct Files {
    dests: Vec<Option<PathBuf>>,
    open: HashMap<(usize, Option<String>), tempfile::NamedTempFile>,
    written: usize,
}

impl Files {
    fn piece(&mut self, piece: Piece) -> anyhow::Result<()> {
        let Some(Some(dest)) = self.dests.get(piece.output) else {
            bail!("the daemon sent a file for output {}, which has no dest", piece.output);
        };
        let key = (piece.output, piece.unpack_into.clone());
        let file = match self.open.entry(key.clone()) {
            std::collections::hash_map::Entry::Occupied(file) => file.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(temporary_for(dest, piece.unpack_into.is_some())?)
            }
        };
        file.write_all(&piece.data).with_context(|| format!("writing {}", dest.display()))?;
        if !piece.last {
            return Ok(());
        }
        let mut file = self.open.remove(&key).expect("the file is open");
        match &piece.unpack_into {
            Some(subdir) => unpack(file.as_file_mut(), dest, subdir)?,
            None => {
                file.as_file().sync_all().with_context(|| format!("writing {}", dest.display()))?;
                file.persist(dest).with_context(|| format!("writing {}", dest.display()))?;
            }
        }
        self.written += 1;
        Ok(())
    }
}

/// A temporary file: beside `dest` for a file output (renamed over it at the end), in the
/// system's temporary directory for a tar that gets unpacked.
fn temporary_for(dest: &Path, unpack: bool) -> anyhow::Result<tempfile::NamedTempFile> {
    let dir = match (unpack, dest.parent()) {
        (false, Some(parent)) => parent.to_path_buf(),
        _ => std::env::temp_dir(),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // 0666 less the umask, as any file this user writes (a tempfile is 0600 otherwise).
    use std::os::unix::fs::PermissionsExt as _;
    tempfile::Builder::new()
        .prefix(".kiln-output-")
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(&dir)
        .with_context(|| format!("writing in {}", dir.display()))
}

/// Unpacks a local output's tar into `dest/subdir`, every entry confined to `dest`.
fn unpack(tar: &mut std::fs::File, dest: &Path, subdir: &str) -> anyhow::Result<()> {
    // The daemon names a platform directory (`linux_amd64`) or nothing: never a path.
    if !subdir.is_empty() && (subdir.contains('/') || subdir == "." || subdir == "..") {
        bail!("the daemon sent files for a directory {subdir:?} that is not one name under {}", dest.display());
    }
    tar.rewind()?;
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let target = dest.join(subdir);
    kiln_layer::extract_archive(std::io::BufReader::new(tar), dest, &target)
        .with_context(|| format!("writing the result's files into {}", target.display()))?;
    Ok(())
}
