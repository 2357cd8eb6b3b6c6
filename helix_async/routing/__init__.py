"""Request routing: MaxFlow + IWRR with KV admission, the admission queue, and baseline policies.

The one import site of the routing twins (compiled unless HELIX_NO_EXTENSIONS=1): ``XPy`` is the
pure-Python specification, ``XC`` the compiled twin (None in a pure build) and ``X`` the one the
rest of the package uses, for X in IWRR, KVTracker and FlowRouter. A compiled FlowRouter needs a
compiled KVTracker; ``FlowRouter.from_plan`` builds the matching one when none is given.

* :class:`IWRR` -- weighted round robin by virtual finish time at one scheduling node (§7.1);
* :class:`KVTracker` -- the KV-cache expectation used for admission (§7.2);
* :class:`FlowRouter` -- route selection, hop by hop from the source, greedy first and
  backtracking only on dead ends (§7.1); a route is a :data:`helix_async.ids.Route` (compute
  stages only, the sink implicit), the shape work messages carry as is;
* :class:`AdmissionQueue` -- bounded FIFO for requests that cannot be placed yet (pure Python);
* :class:`SwarmPolicy`, :class:`RandomPolicy`, :class:`ShortestQueuePolicy` -- per-hop baselines
  (§7.3-7.5, pure Python); :func:`node_seed` derives the per-node seed the random ones require;
* :data:`POLICIES` -- the policies by name (``policies``): how to build the host's router or a
  node's chooser, and what a node needs for it; the simulator and the runtime both pick from it.
"""

from __future__ import annotations

from .. import _ext
from ._iwrr_py import IWRR as IWRRPy
from ._kv_py import KVTracker as KVTrackerPy
from ._router_py import MIN_FLOW_SHARE, Admission, AdmissionQueue, RouterLike
from ._router_py import FlowRouter as FlowRouterPy
from .baselines import RandomPolicy, ShortestQueuePolicy, SwarmPolicy, node_seed
from .policies import POLICIES, Policy, get_policy, runtime_policy

_mod = _ext.load("_routing")
IWRRC = None if _mod is None else _mod.IWRR
KVTrackerC = None if _mod is None else _mod.KVTracker
FlowRouterC = None if _mod is None else _mod.FlowRouter
COMPILED: bool = _mod is not None
IWRR = IWRRPy if IWRRC is None else IWRRC
KVTracker = KVTrackerPy if KVTrackerC is None else KVTrackerC
FlowRouter = FlowRouterPy if FlowRouterC is None else FlowRouterC

__all__ = [
    "COMPILED",
    "IWRR",
    "MIN_FLOW_SHARE",
    "POLICIES",
    "Admission",
    "AdmissionQueue",
    "FlowRouter",
    "FlowRouterC",
    "FlowRouterPy",
    "IWRRC",
    "IWRRPy",
    "KVTracker",
    "KVTrackerC",
    "KVTrackerPy",
    "Policy",
    "RandomPolicy",
    "RouterLike",
    "ShortestQueuePolicy",
    "SwarmPolicy",
    "get_policy",
    "node_seed",
    "runtime_policy",
]
