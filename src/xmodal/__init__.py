"""xmodal: single-stimulus intra-modal dispersion (GPA) and cross-modal convergence (CKNNA).

The library behind the Snakemake workflow. It never imports Snakemake: every function takes
arrays, paths or plain values and can be used from a notebook.
"""

__version__ = "0.1.0"
