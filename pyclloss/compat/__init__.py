"""Drop-in replacements for the contrastive losses of other libraries: the
same constructors, forward signatures, values and gradients, computed by
pyclloss's kernels. Swap the import and keep the training code:

* :mod:`pyclloss.compat.open_clip`: ``ClipLoss``, ``SigLipLoss``;
* :mod:`pyclloss.compat.lightly`: ``NTXentLoss`` (with its memory bank);
* :mod:`pyclloss.compat.pml`: pytorch-metric-learning's ``NTXentLoss`` and
  ``SupConLoss`` (labels, ``indices_tuple``, ``ref_emb``, reducers).

An argument combination an adapter does not reproduce exactly raises
``NotImplementedError`` saying so; none computes something else. None of
them needs the other library installed.
"""
