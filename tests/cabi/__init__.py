"""The C ABI: libbtns-ipsec.so, ipsec_api.h and btns-ipsec.pc, built and used for real."""
