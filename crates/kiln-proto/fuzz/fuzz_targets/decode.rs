//! Decodes arbitrary bytes as the messages a daemon receives from clients and nodes, and
//! turns each into its domain type as the services do. Byte 0 picks the message; the rest is
//! its protobuf encoding. Errors are expected results; a panic is a crash. A build request
//! that is accepted must hold only clean relative context paths.
#![no_main]

use kiln_proto::convert;
use kiln_proto::v1;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else { return };
    match kind % 9 {
        0 => {
            let Ok(request) = v1::BuildRequest::decode(bytes) else { return };
            if let Ok(request) = convert::request_from_proto(request) {
                request.check_bounds().expect("an accepted request is within its bounds");
                for entry in request.context_manifest.iter().flat_map(|m| &m.entries) {
                    let path = entry.path.as_str();
                    assert!(!path.is_empty() && !path.starts_with('/') && !path.contains('\0'), "{path:?}");
                    assert!(path.split('/').all(|p| !p.is_empty() && p != "." && p != ".."), "{path:?}");
                }
            }
        }
        1 => {
            let Ok(register) = v1::Register::decode(bytes) else { return };
            let _ = convert::register_from_proto(register);
        }
        2 => {
            let Ok(result) = v1::JobResult::decode(bytes) else { return };
            let _ = convert::job_result_from_proto(result);
        }
        3 => {
            let Ok(push) = v1::PushLayers::decode(bytes) else { return };
            let _ = convert::push_from_proto(push);
        }
        4 => {
            let Ok(pushed) = v1::Pushed::decode(bytes) else { return };
            let _ = convert::pushed_from_proto(pushed);
        }
        5 => {
            let Ok(event) = v1::BuildEvent::decode(bytes) else { return };
            if let Some(event) = event.event {
                let _ = convert::event_from_proto(event);
            }
        }
        6 => {
            let Ok(record) = v1::UsageRecord::decode(bytes) else { return };
            let _ = convert::usage_from_proto(record);
        }
        7 => {
            let Ok(worker) = v1::WorkerDescription::decode(bytes) else { return };
            let _ = convert::worker_from_proto(worker);
        }
        _ => {
            let Ok(request) = v1::FindMissingRequest::decode(bytes) else { return };
            for digest in &request.digests {
                let _ = convert::parse_digest(digest, "a digest to look for");
            }
        }
    }
});
