"""HTTP downloading and image decode / resize / encode."""
