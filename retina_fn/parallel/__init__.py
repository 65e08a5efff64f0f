"""Distribution: launch environment, device/backend choice, process group and pytree collectives (the only
package that knows about process groups; the train step gets `runtime.reduce_mean` as its `reduce`)."""

from retina_fn.parallel.backend import DeviceChoice, DeviceUnavailable, activate_device, resolve_device, select_device
from retina_fn.parallel.collectives import LeafChecksum, ReplicaMismatch, plan_buckets, tree_checksum
from retina_fn.parallel.env import LaunchEnv, LaunchError, read_launch_env
from retina_fn.parallel.runtime import CollectiveError, Runtime, init

__all__ = ["CollectiveError", "DeviceChoice", "DeviceUnavailable", "LaunchEnv", "LaunchError", "LeafChecksum",
           "ReplicaMismatch", "Runtime", "activate_device", "init", "plan_buckets", "read_launch_env", "resolve_device",
           "select_device", "tree_checksum"]
