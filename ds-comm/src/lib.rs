//! `ds-comm`: a component of the `ds` training runtime (implementation in progress).
