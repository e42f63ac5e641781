SIMULATOR ONLY: the notify provider simulator's APNs auth key (key ID SIMKEY0001, team SIMTEAM001).
A test key made for local runs and tests; Apple has never seen it and it opens nothing.
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQghkwoJEg70EmDAx0v
W8W+dGi2P1yuVz/yEdLZa3sdNl+hRANCAATjIJK6K/ZYfoukCAEUi8JH7KU1W28/
yVnKxCxvLgB4I2wybwiLMur06mYXk/qEqKCHEkjdp5Ysjq2XpH8EHODL
-----END PRIVATE KEY-----
