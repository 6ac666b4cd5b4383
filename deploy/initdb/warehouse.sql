-- The warehouse database of the example, beside the state database the image creates.
CREATE DATABASE sluice_warehouse;
