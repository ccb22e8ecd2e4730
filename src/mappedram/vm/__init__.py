"""The built-in guests: a micro-VM on /dev/kvm and the same workload in software.

* :mod:`.guest`: the contract both guests share (layout, parameters, workload oracle,
  the :class:`~.guest.Guest` protocol);
* :mod:`.kvm` (KVM ioctls), :mod:`.vcpu_thread`, :mod:`.cpustate`, :mod:`.microvm`:
  the KVM guest; :mod:`.workload` is its program (assembled from ``workload.S``);
* :mod:`.softguest`, :mod:`.softvm`: the software guest;
* :mod:`.ops`: run, save live, restore, demo, returning reports.

Nothing outside this package and the CLI imports it.
"""
