//! Proto requests into domain requests; errors are the client's (invalid argument).

use std::path::PathBuf;

use kiln_engine::{BuildRequest, OutputSpec};
use kiln_proto::convert::manifest_from_proto;
use kiln_proto::v1;

pub(crate) fn build_request(request: v1::BuildRequest) -> Result<BuildRequest, String> {
    let platforms = request
        .platforms
        .iter()
        .map(|p| p.parse().map_err(|e| format!("--platform {p}: {e}")))
        .collect::<Result<Vec<_>, String>>()?;
    let outputs = request.outputs.iter().map(|o| OutputSpec::parse(o)).collect::<Result<Vec<_>, String>>()?;
    Ok(BuildRequest {
        dockerfile: request.dockerfile,
        file_name: if request.file_name.is_empty() { "Dockerfile".into() } else { request.file_name },
        context: PathBuf::from(request.context_path),
        dockerignore: request.dockerignore,
        target: (!request.target.is_empty()).then_some(request.target),
        build_args: request.build_args.into_iter().collect(),
        platforms,
        no_cache: request.no_cache,
        max_parallelism: (request.max_parallelism > 0).then_some(request.max_parallelism as usize),
        secrets: request.secrets.into_iter().collect(),
        outputs,
        context_manifest: request.context.map(manifest_from_proto).transpose().map_err(|e| e.to_string())?,
        spool: None,
    })
}
