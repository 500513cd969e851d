"""The node's eBPF datapath: C sources and prebuilt objects, and their Python binding.

- ``np.h`` / ``policy.bpf.c``: the shared layouts and the tc programs (``make -C bpf``).
- :mod:`bpf.layout`: ctypes mirrors of ``np.h`` (checked against the object's BTF).
- :mod:`bpf.maps`, :mod:`bpf.objects`, :mod:`bpf.ringbuf`, :mod:`bpf.btf`: a thin ctypes
  binding over the system ``libbpf.so.1`` (:mod:`bpf._libbpf` is its only loader).
- :mod:`bpf.ruleset`: NetworkPolicy peer rules compiled into trie entries (pure Python).
- :mod:`bpf.datapath`: the loaded datapath, pods programmed atomically.

Importing this package loads nothing; the pure modules work without libbpf.
"""
