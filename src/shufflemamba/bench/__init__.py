"""The measuring tools, apart from the library: the benchmark suite (``shufflemamba bench``), Vim vs
ViT, the GPU check (``shufflemamba doctor --gpu``), the scan timings and the Triton compile report."""
