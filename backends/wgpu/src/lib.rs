//! pipit-wgpu: the portable GPU backend.
