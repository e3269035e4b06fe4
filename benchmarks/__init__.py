"""The benchmark harness behind ``cfgswitch bench``."""
