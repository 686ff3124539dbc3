"""The libreswan backend's lab: plutos in namespaces (runner) and a ready two-pluto lab (lab)."""
