//! ds-engine
