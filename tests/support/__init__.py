"""Modules the tests share: flows the workers import (``--import support.sample_flows``), helpers for
processes, the console and deploy/, the autoscaler."""
