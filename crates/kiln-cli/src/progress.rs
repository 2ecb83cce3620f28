//! Build progress as BuildKit users know it: `tty` (a live block), `plain` (`#N` lines with
//! output), `json` (one event per line).

use std::collections::HashMap;
use std::io::Write as _;
use std::time::Instant;

use kiln_client::BuildEvent;
use kiln_model::{Status, VertexRecord};
use kiln_types::{Digest, rfc3339_millis};

/// The progress format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// `tty` on a terminal, `plain` otherwise.
    Auto,
    /// A live, redrawn block.
    Tty,
    /// Line by line.
    Plain,
    /// One JSON object per event.
    Json,
}

struct Step {
    name: String,
    number: usize,
    started: Option<u64>,
    completed: Option<u64>,
    status: Option<Status>,
}

/// Renders events as they arrive.
pub struct Renderer {
    mode: Mode,
    /// Kiln's debug lines are shown.
    debug: bool,
    begun: Instant,
    steps: Vec<Step>,
    /// Steps by bake target (`""` for `kiln build`) and vertex: a vertex two targets share
    /// is a step of each.
    index: HashMap<(String, Digest), usize>,
    exports: HashMap<String, usize>,
    drawn: usize,
    /// When the live block was last drawn: builds running side by side (bake) share it, and
    /// it is drawn at most ten times a second.
    last_draw: Option<Instant>,
}

impl Renderer {
    /// A renderer for `mode` (`auto` resolved against stderr), showing debug lines when
    /// `debug`.
    pub fn new(mode: Mode, debug: bool) -> Renderer {
        use std::io::IsTerminal as _;
        let mode = match mode {
            Mode::Auto if std::io::stderr().is_terminal() => Mode::Tty,
            Mode::Auto => Mode::Plain,
            other => other,
        };
        Renderer {
            mode,
            debug,
            begun: Instant::now(),
            steps: Vec::new(),
            index: HashMap::new(),
            exports: HashMap::new(),
            drawn: 0,
            last_draw: None,
        }
    }

    fn elapsed(step: &Step) -> f64 {
        match (step.started, step.completed) {
            (Some(start), Some(end)) => end.saturating_sub(start) as f64 / 1000.0,
            (Some(start), None) => kiln_types::now_ms().saturating_sub(start) as f64 / 1000.0,
            _ => 0.0,
        }
    }

    /// Handles one event of a build (`target`: the bake target it is for, whose name
    /// prefixes its steps').
    pub fn event(&mut self, target: Option<&str>, event: &BuildEvent) {
        if let BuildEvent::Log { line, .. } = event
            && line.stream == kiln_model::LogStream::Debug
            && !self.debug
        {
            return;
        }
        if self.mode == Mode::Json {
            let mut json = json_event(event);
            if let Some(target) = target {
                json["target"] = target.into();
            }
            println!("{json}");
            return;
        }
        let key = |vertex: &Digest| (target.unwrap_or_default().to_string(), *vertex);
        match event {
            BuildEvent::Planned(vertices) => {
                for record in vertices {
                    let name = match target {
                        Some(target) => format!("[{target}] {}", record.name),
                        None => record.name.clone(),
                    };
                    self.add(key(&record.digest), &name);
                }
            }
            BuildEvent::Started { vertex, at } => {
                if let Some(&i) = self.index.get(&key(vertex)) {
                    self.steps[i].started.get_or_insert(*at);
                    if self.mode == Mode::Plain {
                        eprintln!("#{} {}", self.steps[i].number, self.steps[i].name);
                    }
                }
            }
            BuildEvent::Log { vertex, line } => {
                if let (Mode::Plain, Some(&i)) = (self.mode, self.index.get(&key(vertex))) {
                    let at = self.begun.elapsed().as_secs_f64();
                    eprintln!("#{} {at:.3} {}", self.steps[i].number, line.line);
                }
            }
            BuildEvent::Completed { record, error } => self.completed(key(&record.digest), record, error.as_deref()),
            BuildEvent::Export { name, started, completed } => {
                let name = match target {
                    Some(target) => format!("[{target}] {name}"),
                    None => name.clone(),
                };
                let name = &name;
                let i = match self.exports.get(name) {
                    Some(&i) => i,
                    None => {
                        let i = self.add(key(&Digest::of(name.as_bytes())), name);
                        self.exports.insert(name.clone(), i);
                        if self.mode == Mode::Plain {
                            eprintln!("#{} {name}", self.steps[i].number);
                        }
                        i
                    }
                };
                self.steps[i].started = Some(*started);
                if let Some(done) = completed {
                    self.steps[i].completed = Some(*done);
                    self.steps[i].status = Some(Status::Executed);
                    if self.mode == Mode::Plain {
                        eprintln!("#{} DONE {:.1}s", self.steps[i].number, Self::elapsed(&self.steps[i]));
                    }
                }
            }
            BuildEvent::ExportData { .. } | BuildEvent::Result { .. } => {}
        }
        if self.mode == Mode::Tty {
            self.draw(false);
        }
    }

    fn add(&mut self, key: (String, Digest), name: &str) -> usize {
        let number = self.steps.len() + 1;
        self.steps.push(Step { name: name.to_string(), number, started: None, completed: None, status: None });
        self.index.insert(key, number - 1);
        number - 1
    }

    fn completed(&mut self, key: (String, Digest), record: &VertexRecord, error: Option<&str>) {
        let Some(&i) = self.index.get(&key) else { return };
        let step = &mut self.steps[i];
        step.status = Some(record.status);
        step.started = step.started.or(record.started);
        step.completed = record.completed;
        if self.mode != Mode::Plain {
            return;
        }
        let number = step.number;
        match record.status {
            Status::Cached => {
                if step.started.is_none() || record.started == record.completed {
                    eprintln!("#{number} {}", step.name);
                }
                eprintln!("#{number} CACHED");
            }
            Status::Failed => eprintln!("#{number} ERROR: {}", error.unwrap_or("failed")),
            _ => eprintln!("#{number} DONE {:.1}s", Self::elapsed(step)),
        }
    }

    /// Redraws the live block (`tty`); `finished` adds `FINISHED` to the header.
    pub fn draw(&mut self, finished: bool) {
        if self.mode != Mode::Tty {
            return;
        }
        if !finished && self.last_draw.is_some_and(|at| at.elapsed() < std::time::Duration::from_millis(100)) {
            return;
        }
        self.last_draw = Some(Instant::now());
        let mut out = String::new();
        if self.drawn > 0 {
            out.push_str(&format!("\x1b[{}A", self.drawn));
        }
        let done = self.steps.iter().filter(|s| s.status.is_some()).count();
        let header = format!(
            "[+] Building {:.1}s ({done}/{}){}",
            self.begun.elapsed().as_secs_f64(),
            self.steps.len(),
            if finished { " FINISHED" } else { "" }
        );
        let mut lines = vec![header];
        for step in self.steps.iter().filter(|s| s.started.is_some() || s.status.is_some()) {
            let prefix = match step.status {
                Some(Status::Cached) => "CACHED ",
                Some(Status::Failed) => "ERROR ",
                _ => "",
            };
            let name: String = format!("{prefix}{}", step.name).chars().take(70).collect();
            lines.push(format!(" => {name:<72} {:>5.1}s", Self::elapsed(step)));
        }
        for line in &lines {
            out.push_str("\x1b[2K");
            out.push_str(line);
            out.push('\n');
        }
        self.drawn = lines.len();
        let mut stderr = std::io::stderr();
        let _ = stderr.write_all(out.as_bytes());
        let _ = stderr.flush();
    }
}

fn record_json(record: &VertexRecord) -> serde_json::Value {
    let mut json = serde_json::json!({
        "digest": record.digest.to_string(),
        "name": record.name,
        "kind": record.kind,
        "stage": record.stage,
        "status": record.status,
        "worker": record.worker,
        "platform": record.platform,
        "started": record.started.map(rfc3339_millis),
        "completed": record.completed.map(rfc3339_millis),
        "cache_source": record.cache_source,
    });
    // Executed vertices say where their time went (ms per phase).
    if !record.phases.is_empty() {
        json["phases"] = serde_json::to_value(record.phases).expect("phases serialise");
    }
    // A deduplicated vertex names the build that executed it.
    if let Some(from) = &record.deduplicated_from {
        json["deduplicated_from"] = from.as_str().into();
    }
    json
}

/// The metadata file's vertex list.
pub fn records_json(records: &[VertexRecord]) -> serde_json::Value {
    serde_json::Value::Array(records.iter().map(record_json).collect())
}

fn json_event(event: &BuildEvent) -> serde_json::Value {
    match event {
        BuildEvent::Planned(vertices) => serde_json::json!({"type": "planned", "vertices": records_json(vertices)}),
        BuildEvent::Started { vertex, at } => {
            serde_json::json!({"type": "started", "vertex": vertex.to_string(), "time": rfc3339_millis(*at)})
        }
        BuildEvent::Log { vertex, line } => {
            serde_json::json!({"type": "log", "vertex": vertex.to_string(), "stream": line.stream, "line": line.line})
        }
        BuildEvent::Completed { record, error } => {
            serde_json::json!({"type": "completed", "vertex": record_json(record), "error": error})
        }
        BuildEvent::Export { name, started, completed } => serde_json::json!({
            "type": "export", "name": name, "started": rfc3339_millis(*started), "completed": completed.map(rfc3339_millis)
        }),
        BuildEvent::ExportData { output, data, last, .. } => {
            serde_json::json!({"type": "export-data", "output": output, "bytes": data.len(), "last": last})
        }
        BuildEvent::Result { error, image, .. } => serde_json::json!({
            "type": "result", "ok": error.is_none(), "error": error, "image": image.map(|d| d.to_string())
        }),
    }
}
