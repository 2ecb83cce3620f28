//! A vertex's output, line by line.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Which stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// Kiln's own word on the step, shown with `kiln --debug` (an admission decision).
    Debug,
}

/// One line of a vertex's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// The stream.
    pub stream: LogStream,
    /// The text, without newline.
    pub line: String,
}

/// Where an executor sends a vertex's output lines (to every build waiting on the vertex).
#[derive(Clone)]
pub struct LogSink(Arc<dyn Fn(LogLine) -> bool + Send + Sync>);

impl LogSink {
    /// A sink that calls `deliver` for each line; `deliver` says whether anyone still listens.
    pub fn new(deliver: impl Fn(LogLine) -> bool + Send + Sync + 'static) -> LogSink {
        LogSink(Arc::new(deliver))
    }

    /// A sink nobody reads.
    pub fn discard() -> LogSink {
        LogSink::new(|_| true)
    }

    /// Sends one line; `Err` when nobody listens any more.
    pub fn send(&self, line: LogLine) -> Result<(), LogLine> {
        if (self.0)(line.clone()) { Ok(()) } else { Err(line) }
    }
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogSink")
    }
}

/// The most lines kept per step.
pub const MAX_STEP_LINES: usize = 4096;

/// What a kept line costs beyond its text, in bytes (its place in memory).
pub const LINE_COST: usize = 32;

/// One step's kept output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepLog {
    /// Its last lines.
    pub lines: std::collections::VecDeque<LogLine>,
    /// Their bytes.
    #[serde(default)]
    bytes: usize,
    /// Lines that rotated out.
    pub dropped: u64,
}

impl StepLog {
    /// The bytes of its lines.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Appends `line`, dropping the oldest lines past `limit` bytes or [`MAX_STEP_LINES`]. A
    /// line counts [`LINE_COST`] bytes beyond its text (an empty line is not free).
    pub fn push(&mut self, line: LogLine, limit: usize) {
        self.bytes += line.line.len() + LINE_COST;
        self.lines.push_back(line);
        while (self.bytes > limit || self.lines.len() > MAX_STEP_LINES)
            && let Some(old) = self.lines.pop_front()
        {
            self.bytes -= old.line.len() + LINE_COST;
            self.dropped += 1;
        }
    }
}
