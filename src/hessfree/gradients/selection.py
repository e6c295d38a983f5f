"""Which parameters influence is computed over; defined in :mod:`hessfree.params`, re-exported here."""

from ..params import ParamSpec, modules_in_call_order, select_parameters

__all__ = ["ParamSpec", "modules_in_call_order", "select_parameters"]
