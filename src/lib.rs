//! shmocker: a daemonless, rootless container image builder. Turns a Dockerfile and a build
//! context into an OCI image and pushes it; see README.md and docs/ for the user's view, and
//! ARCHITECTURE in docs/ for how the modules below follow a build.

pub mod ci;
pub mod detect;
pub mod dockerfile;
pub mod engine;
pub mod image;
pub mod layer;
pub mod progress;
pub mod registry;
pub mod sandbox;
pub mod snapshot;
pub mod store;
