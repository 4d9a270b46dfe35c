//! Seccomp: Docker's default profile, Docker's JSON format, compilation to BPF, install.
