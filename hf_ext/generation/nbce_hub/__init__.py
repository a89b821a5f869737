"""The NBCE `custom_generate` folder: upload it to a Hub repo as is (see its README.md)."""
