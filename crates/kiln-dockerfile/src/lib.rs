//! Kiln's Dockerfile front end.
//!
//! Text goes through pure steps: [`parser`] turns it into raw instruction nodes (BuildKit's
//! AST, with line numbers and heredocs), [`instructions`] types them and splits stages,
//! [`shell`] expands variables by BuildKit's rules, and [`convert`] turns the stages the
//! target needs into a [`kiln_graph::Graph`]. The build context is reached only through the
//! [`context::ContextFiles`] trait and `.dockerignore` rules live in [`ignore`], so this
//! crate does no IO.

pub mod context;
pub mod convert;
pub mod ignore;
pub mod image;
pub mod instructions;
pub mod parser;
pub mod shell;

pub use convert::{BuildPlan, ConvertOptions, FrontendError, NamedInput, convert};
