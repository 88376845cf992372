//! The frozen vision-language encoder (InternVL3 layout).
