-- The three services' databases, created once when the PostgreSQL volume is new.
CREATE DATABASE orders;
CREATE DATABASE payments;
CREATE DATABASE inventory;
