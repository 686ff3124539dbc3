"""btns-lab: the test and demo lab of btns-vici, kept out of the library's wheel.

* :mod:`btns_lab.testbed`: two charons in network namespaces joined by a veth pair;
* :mod:`btns_lab.demo`: the two-peer demo on it; :mod:`btns_lab.compose`: the same demo on
  the compose testbed (docker/), one job per module;
* :mod:`btns_lab.cli`: ``btns testbed`` and ``btns demo`` (entry point group ``btns_vici.cli``);
* :mod:`btns_lab.pytest_plugin`: the testbed fixtures (entry point group ``pytest11``);
* :mod:`btns_lab.libreswan`: two plutos in namespaces (the libreswan backend's lab).
"""
