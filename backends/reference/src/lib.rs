//! pipit-reference: the host reference backend.
