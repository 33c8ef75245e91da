"""Shared pytest configuration."""


def pytest_configure(config):
    # GPU-only tests (CUDA extension, bf16 speed): marked and skipped without CUDA (DESIGN.md section 6).
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped on the CPU machine")
    config.addinivalue_line("markers", "slow: takes minutes on the 2-core CPU machine (e.g. real-launcher runs)")
    config.addinivalue_line("markers", "slurm: starts a one-machine Slurm cluster (slurm-wlm + munge, root); "
                                       "skipped with the reason when it cannot start")
