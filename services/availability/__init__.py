"""Read side for drivers and the city: search, lot detail, streams, history, city API."""
