"""Ray Serve and the Ray Data bulk job."""
