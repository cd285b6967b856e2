//! `ds-zero`: a component of the `ds` training runtime.
//!
//! This crate is reserved in the workspace layout (see the workspace README); its
//! implementation lands with its own issue. It exposes no API yet on purpose.
