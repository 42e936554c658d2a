"""Optional integrations with the tools researchers already use.

* :mod:`biasshift.integrations.tensorboard` (``pip install biasshift[tensorboard]``): per-layer
  summaries and histograms of :class:`~biasshift.ActivationMonitor`,
  :func:`~biasshift.probe_statistics` and :class:`~biasshift.BiasShiftProbe` in TensorBoard.
* :mod:`biasshift.integrations.lightning` (``pip install biasshift[lightning]``): a Lightning
  ``Callback`` that attaches the monitor (and the probe) to a ``LightningModule``.

Neither is imported by ``import biasshift``; each imports its framework on first use.
"""
