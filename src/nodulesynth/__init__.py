"""nodulesynth: lesion maps of chest CT, lesion-map-to-CT synthesis (SDM, SPADE) and a downstream study."""

__version__ = "0.1.0"
