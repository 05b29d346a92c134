"""The shipped configs (ml_collections): `--config NAME` finds them from any folder, and a user's own
config file starts from `from flaxtl.configs import default`."""
