//! The operations a vertex can perform; their serde encoding is what a digest hashes.
//!
//! Field order and names are part of the digest contract: changing them changes every
//! digest (and so invalidates caches), so treat them like a wire format.

use kiln_types::{Digest, ImageReference, Platform};
use serde::{Deserialize, Serialize};

/// Where an op reads a filesystem from: one of the vertex's inputs, or nothing at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Input {
    /// The empty filesystem (`FROM scratch`).
    Scratch,
    /// The vertex input at this index.
    Index(usize),
}

/// One unit of build work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// Brings outside content in: an image, the build context, a URL, a git repository.
    Source(SourceOp),
    /// Runs a command in a container over its root filesystem input.
    Exec(ExecOp),
    /// Applies file actions (copy, mkfile, mkdir, rm) without a container.
    File(FileOp),
    /// Stacks its inputs' layers in order (`COPY --link`).
    Merge(MergeOp),
}

/// The coarse kind of an op, as `kiln plan` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpKind {
    /// A source op.
    Source,
    /// An exec op.
    Exec,
    /// A file op.
    File,
    /// A merge op.
    Merge,
}

impl OpKind {
    /// The lowercase name used in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Source => "source",
            OpKind::Exec => "exec",
            OpKind::File => "file",
            OpKind::Merge => "merge",
        }
    }
}

impl Op {
    /// The coarse kind of this op.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Source(_) => OpKind::Source,
            Op::Exec(_) => OpKind::Exec,
            Op::File(_) => OpKind::File,
            Op::Merge(_) => OpKind::Merge,
        }
    }

    /// The ids of the secrets a RUN step mounts (none for other ops).
    pub fn secret_ids(&self) -> Vec<&str> {
        match self {
            Op::Exec(exec) => exec.secret_ids(),
            _ => Vec::new(),
        }
    }
}

/// Content from outside the graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case")]
pub enum SourceOp {
    /// A base image, unresolved until the solver resolves the reference to a manifest.
    Image {
        /// The normalised reference as written (tag or digest).
        reference: ImageReference,
        /// The platform to pick from a multi-platform index.
        platform: Platform,
    },
    /// A selection of files from a local build context, keyed by their content.
    Local {
        /// Context name (`context` for the main build context).
        name: String,
        /// Paths or patterns selected, relative to the context root.
        include: Vec<String>,
        /// Patterns removed from the selection (`.dockerignore` is already applied).
        exclude: Vec<String>,
        /// Digest over paths, modes and file contents of the selected files.
        content: Digest,
    },
    /// A file downloaded over HTTP(S) (`ADD <url>`).
    Http {
        /// The URL.
        url: String,
        /// Expected digest of the body (`ADD --checksum`).
        checksum: Option<Digest>,
        /// File name to store the body under.
        filename: String,
    },
    /// A git repository checkout (`ADD <git url>`).
    Git {
        /// Remote URL without the fragment.
        remote: String,
        /// Branch, tag or commit from the `#ref` fragment.
        reference: Option<String>,
        /// Subdirectory from the `#ref:subdir` fragment.
        subdir: Option<String>,
        /// Keep the `.git` directory (`ADD --keep-git-dir`).
        keep_git_dir: bool,
    },
}

/// Network mode of a RUN step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    /// The worker's default network.
    #[default]
    Default,
    /// An empty network namespace.
    None,
    /// The host's network namespace.
    Host,
}

/// Security mode of a RUN step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SecurityMode {
    /// The default sandbox.
    #[default]
    Sandbox,
    /// Extra privileges (`--security=insecure`).
    Insecure,
}

/// A command run in a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOp {
    /// argv of the process (shell form already wrapped in the shell).
    pub args: Vec<String>,
    /// Environment as `KEY=value`, in order.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// User (and group) to run as; empty means root.
    pub user: String,
    /// Network mode.
    pub network: NetworkMode,
    /// Security mode.
    pub security: SecurityMode,
    /// The root filesystem.
    pub rootfs: Input,
    /// Extra mounts from `RUN --mount`, in Dockerfile order.
    pub mounts: Vec<Mount>,
    /// The platform the command runs on.
    pub platform: Platform,
}

impl ExecOp {
    /// The ids of the secrets it mounts.
    pub fn secret_ids(&self) -> Vec<&str> {
        self.mounts
            .iter()
            .filter_map(|mount| match &mount.kind {
                MountKind::Secret(secret) => Some(secret.id.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// One `RUN --mount`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// Mount point inside the container.
    pub target: String,
    /// What is mounted there.
    pub kind: MountKind,
}

/// Sharing mode of a cache mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CacheSharing {
    /// Concurrent writers share one directory.
    #[default]
    Shared,
    /// Each concurrent writer gets its own directory.
    Private,
    /// Writers wait for each other.
    Locked,
}

/// Owner of created files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chown {
    /// User name or numeric id, as written.
    pub user: String,
    /// Group name or numeric id, as written.
    pub group: Option<String>,
}

/// A secret mount (never part of a layer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMount {
    /// Secret id.
    pub id: String,
    /// Expose as this environment variable instead of (or besides) a file.
    pub env: Option<String>,
    /// Fail when the secret is not provided.
    pub required: bool,
    /// File mode.
    pub mode: u32,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
}

/// An ssh agent socket mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshMount {
    /// Ssh id.
    pub id: String,
    /// Fail when no agent is provided.
    pub required: bool,
    /// Socket mode.
    pub mode: u32,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
}

/// What a `RUN --mount` mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum MountKind {
    /// A path from another input (the context, a stage or an image).
    Bind {
        /// The filesystem to mount from.
        input: Input,
        /// Path inside that filesystem.
        source: String,
        /// Writes are allowed but discarded.
        readwrite: bool,
    },
    /// A persistent per-worker cache directory.
    Cache {
        /// Cache id (defaults to the target path).
        id: String,
        /// Sharing mode.
        sharing: CacheSharing,
        /// Seed content.
        from: Option<Input>,
        /// Path inside the seed.
        source: String,
        /// Mounted read-only.
        readonly: bool,
        /// Directory mode.
        mode: u32,
        /// Owner uid.
        uid: u32,
        /// Owner gid.
        gid: u32,
    },
    /// An empty tmpfs.
    Tmpfs {
        /// Size limit in bytes.
        size: Option<u64>,
    },
    /// A secret file or variable.
    Secret(SecretMount),
    /// An ssh agent socket.
    Ssh(SshMount),
}

/// File actions applied in order over a base filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOp {
    /// The filesystem the actions modify.
    pub base: Input,
    /// The actions.
    pub actions: Vec<FileAction>,
}

/// A copy from one of the vertex's inputs (`COPY`, `ADD`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyAction {
    /// The filesystem to copy from.
    pub from: Input,
    /// Source paths inside it; may hold wildcards.
    pub sources: Vec<String>,
    /// Destination path (a trailing `/` means "into this directory").
    pub dest: String,
    /// Owner of copied files.
    pub chown: Option<Chown>,
    /// Mode of copied files, octal or symbolic as written.
    pub chmod: Option<String>,
    /// Patterns left out (`--exclude`).
    pub exclude: Vec<String>,
    /// Keep source parent directories (`--parents`).
    pub parents: bool,
    /// Unpack local tar archives (`ADD`).
    pub unpack: bool,
}

/// One file action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum FileAction {
    /// Copy files from an input.
    Copy(CopyAction),
    /// Create a file with fixed content (heredocs).
    Mkfile {
        /// Path of the file.
        path: String,
        /// File mode.
        mode: u32,
        /// Content.
        data: String,
        /// Owner.
        chown: Option<Chown>,
    },
    /// Create a directory (`WORKDIR`).
    Mkdir {
        /// Path of the directory.
        path: String,
        /// Directory mode.
        mode: u32,
        /// Create missing parents.
        parents: bool,
        /// Owner.
        chown: Option<Chown>,
    },
    /// Remove a path.
    Rm {
        /// Path to remove.
        path: String,
        /// Do not fail when it is missing.
        allow_not_found: bool,
    },
}

/// Stacks the layers of every input, in input order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MergeOp {}
