"""The XLA flags our entry points set: added once, never overriding the user's choice."""

import os

from spectral_plasticity import runtime


def test_flag_is_added_and_a_user_choice_is_kept(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    runtime.configure_xla()
    runtime.configure_xla()

    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4",
                                               "--xla_cpu_multi_thread_eigen=false"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
    runtime.configure_xla()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=true"
    monkeypatch.delenv("XLA_FLAGS")
    runtime.configure_xla()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false"
