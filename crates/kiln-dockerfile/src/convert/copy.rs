//! COPY and ADD: file ops from the context, another stage, an image, a URL, a git
//! repository or a heredoc, with `--link` turning the copy into a merge.

use kiln_graph::{CopyAction, FileAction, FileOp, Input, MergeOp, Op, SourceOp, VertexMeta};
use kiln_types::Digest;

use super::dispatch::{display, parse_chown};
use super::state::{StageState, input_index};
use super::{Converter, Failure};
use crate::context::clean_relative;
use crate::instructions::{AddCopy, Command};
use crate::parser::{Heredoc, parse_heredoc};
use crate::shell::Lexer;

/// One source of a COPY/ADD after expansion.
enum Source {
    /// A path in the context or in `--from`.
    Path(String),
    /// An `ADD` URL.
    Url(String),
    /// An `ADD` git repository.
    Git(String),
    /// A heredoc body.
    Inline(Heredoc),
}

/// The download of `url` and the file name it is stored under (the URL's last path
/// segment, `__unnamed__` when it has none, as BuildKit names it).
pub(super) fn http_op(url: &str, checksum: Option<Digest>) -> (Op, String) {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let after_scheme = path.split_once("://").map_or(path, |(_, r)| r);
    let filename = after_scheme.split_once('/').map(|(_, p)| p.rsplit('/').next().unwrap_or("")).unwrap_or("");
    let filename = if filename.is_empty() { "__unnamed__".to_owned() } else { filename.to_owned() };
    (Op::Source(SourceOp::Http { url: url.to_owned(), checksum, filename: filename.clone() }), filename)
}

/// The checkout of a Git URL (`REMOTE#REF:SUBDIR`).
pub(super) fn git_op(url: &str, keep_git_dir: bool) -> Op {
    let (remote, fragment) = url.split_once('#').map_or((url, None), |(r, f)| (r, Some(f)));
    let (reference, subdir) = match fragment {
        Some(f) => match f.split_once(':') {
            Some((r, s)) => {
                (Some(r.to_owned()).filter(|r| !r.is_empty()), Some(s.to_owned()).filter(|s| !s.is_empty()))
            }
            None => (Some(f.to_owned()).filter(|r| !r.is_empty()), None),
        },
        None => (None, None),
    };
    Op::Source(SourceOp::Git { remote: remote.to_owned(), reference, subdir, keep_git_dir })
}

fn is_url(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

pub(super) fn is_git(s: &str) -> bool {
    let base = s.split('#').next().unwrap_or(s);
    s.starts_with("git@") || s.starts_with("git://") || s.starts_with("ssh://") || (is_url(s) && base.ends_with(".git"))
}

fn valid_chmod(mode: &str) -> bool {
    let octal = (3..=4).contains(&mode.len()) && mode.chars().all(|c| ('0'..='7').contains(&c));
    let symbolic = mode.split(',').all(|clause| {
        let who_len = clause.find(|c: char| !"ugoa".contains(c)).unwrap_or(clause.len());
        let rest = &clause[who_len..];
        rest.starts_with(['+', '-', '=']) && rest[1..].chars().all(|c| "rwxXst".contains(c))
    });
    octal || (!mode.is_empty() && symbolic)
}

impl Converter<'_> {
    pub(super) fn dispatch_copy(
        &mut self,
        state: &mut StageState,
        command: &Command,
        copy: &AddCopy,
    ) -> Result<(), Failure> {
        let sources = self.expand_sources(state, copy)?;
        let dest_word = self.expand(state, &copy.dest)?;
        let dest_is_dir =
            dest_word.ends_with('/') || dest_word == "." || dest_word.ends_with("/.") || dest_word.is_empty();
        let mut dest = state.resolve_path(&dest_word);
        if dest_is_dir && dest != "/" {
            dest.push('/');
        }
        let chown = match &copy.chown {
            Some(c) => Some(parse_chown(&self.expand(state, c)?)),
            None => None,
        };
        let chmod = match &copy.chmod {
            Some(c) => {
                let mode = self.expand(state, c)?;
                if !valid_chmod(&mode) {
                    return Err(format!(
                        "invalid chmod parameter: {mode:?} (use octal like 0755 or symbolic like u+x)"
                    )
                    .into());
                }
                Some(mode)
            }
            None => None,
        };
        if copy.checksum.is_some() && !sources.iter().all(|s| matches!(s, Source::Url(_))) {
            return Err("--checksum can only be used with HTTP(S) sources".into());
        }
        let template = CopyAction {
            from: Input::Scratch,
            sources: vec![],
            dest,
            chown,
            chmod,
            exclude: copy.exclude.clone(),
            parents: copy.parents,
            unpack: copy.is_add && copy.unpack != Some(false),
        };
        let mut inputs = Vec::new();
        let base = if copy.link { Input::Scratch } else { state.root_input(&mut inputs) };
        let actions = self.copy_actions(state, command, copy, sources, &template, &mut inputs)?;
        let meta = state.next_meta(&display(command), (command.start_line, command.end_line));
        let copied = self.builder.add(Op::File(FileOp { base, actions }), inputs, meta.clone())?;
        state.root = match (copy.link, state.root) {
            (true, Some(root)) => {
                let merge_meta = VertexMeta { name: format!("{} (link)", meta.name), ..meta };
                Some(self.builder.add(Op::Merge(MergeOp {}), vec![root, copied], merge_meta)?)
            }
            _ => Some(copied),
        };
        Ok(())
    }

    fn expand_sources(&self, state: &StageState, copy: &AddCopy) -> Result<Vec<Source>, Failure> {
        let mut heredocs = copy.heredocs.iter();
        let mut sources = Vec::new();
        for word in &copy.sources {
            let opener = parse_heredoc(word).ok().flatten();
            if let Some(doc) = opener.and_then(|_| heredocs.next()) {
                let mut doc = doc.clone();
                if doc.expand {
                    let lexer = Lexer::new('\\').skip_process_quotes(true);
                    doc.content = lexer.process_word(&doc.content, state)?;
                    self.charge(doc.content.len())?;
                }
                sources.push(Source::Inline(doc));
                continue;
            }
            let expanded = self.expand(state, word)?;
            sources.push(match () {
                _ if copy.is_add && is_git(&expanded) => Source::Git(expanded),
                _ if copy.is_add && is_url(&expanded) => Source::Url(expanded),
                _ if !copy.is_add && copy.from.is_none() && is_url(&expanded) => {
                    return Err(format!("source can't be a URL for COPY: {expanded} (use ADD)").into());
                }
                _ => Source::Path(expanded),
            });
        }
        Ok(sources)
    }

    fn copy_actions(
        &mut self,
        state: &StageState,
        command: &Command,
        copy: &AddCopy,
        sources: Vec<Source>,
        template: &CopyAction,
        inputs: &mut Vec<Digest>,
    ) -> Result<Vec<FileAction>, Failure> {
        let mut actions = Vec::new();
        let paths: Vec<String> =
            sources.iter().filter_map(|s| if let Source::Path(p) = s { Some(p.clone()) } else { None }).collect();
        if !paths.is_empty() {
            let cleaned: Vec<String> = paths.iter().map(|p| clean_relative(p)).collect();
            let from = match &copy.from {
                Some(word) => {
                    let name = self.expand(state, word)?;
                    self.named_source(state, command, &name)?.map_or(Input::Scratch, |d| input_index(inputs, d))
                }
                None => input_index(inputs, self.context_vertex(state, command, &cleaned, &copy.exclude)?),
            };
            let sources = cleaned.iter().map(|p| format!("/{p}")).collect();
            actions.push(FileAction::Copy(CopyAction { from, sources, ..template.clone() }));
        }
        for source in sources {
            let (vertex, path) = match source {
                Source::Path(_) => continue,
                Source::Inline(doc) => (
                    self.inline_document(state, &doc.name, &doc.chomped_content(), 0o644, false)?,
                    format!("/{}", doc.name),
                ),
                Source::Url(url) => self.http_vertex(state, command, &url, copy.checksum.as_deref())?,
                Source::Git(url) => (self.git_vertex(state, command, &url, copy.keep_git_dir)?, "/".to_owned()),
            };
            let from = input_index(inputs, vertex);
            // Only local archives are unpacked; downloads and heredocs are copied as they are.
            actions.push(FileAction::Copy(CopyAction { from, sources: vec![path], unpack: false, ..template.clone() }));
        }
        Ok(actions)
    }

    fn http_vertex(
        &mut self,
        state: &StageState,
        command: &Command,
        url: &str,
        checksum: Option<&str>,
    ) -> Result<(Digest, String), Failure> {
        let checksum = match checksum {
            Some(c) => Some(c.parse::<Digest>().map_err(|e| format!("--checksum: {e}"))?),
            None => None,
        };
        let (op, filename) = http_op(url, checksum);
        let meta = state.unnumbered_meta(
            format!("[{}] ADD {url}", state.name),
            false,
            Some((command.start_line, command.end_line)),
        );
        let digest = self.builder.add(op, vec![], meta)?;
        Ok((digest, format!("/{filename}")))
    }

    fn git_vertex(
        &mut self,
        state: &StageState,
        command: &Command,
        url: &str,
        keep_git_dir: bool,
    ) -> Result<Digest, Failure> {
        let op = git_op(url, keep_git_dir);
        let meta = state.unnumbered_meta(
            format!("[{}] ADD {url}", state.name),
            false,
            Some((command.start_line, command.end_line)),
        );
        Ok(self.builder.add(op, vec![], meta)?)
    }
}
