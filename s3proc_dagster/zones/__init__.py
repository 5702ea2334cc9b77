"""Landing zones: the sources a deployment serves, each declared as a `LandingZone` component."""
