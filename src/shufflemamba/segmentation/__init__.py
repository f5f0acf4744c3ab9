"""Semantic segmentation with our plain Vision Mamba backbones: UperNet (+ auxiliary FCN head) on
four block taps turned into strides 4 / 8 / 16 / 32, folder datasets (ADE20K's layout or images/ and
masks/), sliding-window evaluation with mIoU / mAcc / aAcc, iteration-based training with exact resume.

Modules: ``config`` (defaults, presets), ``data``, ``model``, ``inference``, ``metrics``, ``engine``
(train / evaluate), ``figures``, ``demo`` (a synthetic Fashion-MNIST scene set), ``cli`` (the
``--task segmentation`` side of ``shufflemamba train`` / ``eval``). Nothing is imported here, so the
CLI's flag set-up stays light.
"""
