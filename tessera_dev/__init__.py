"""`tessera dev up`: the whole stack on one machine, for trying and testing."""
