/*
 * itoken_attrs - example 2: iToken attributes in C.
 *
 *   itoken_attrs ITOKEN_FILE
 *
 * The C API has no way to turn the IPSEC_API_ATTR_iToken attribute of a
 * pToken (a serialized iToken) back into an iToken object; btns-vici adds the
 * EXTENSION ipsec_import_iToken() (and ipsec_export_iToken()). This example
 *  1. imports a serialized iToken (written by get_ptoken, or by Python's
 *     IToken.to_bytes()) and prints its attributes;
 *  2. shows that the identity attributes are read-only (EPERM);
 *  3. builds an iToken template that accepts only BTNS or leap-of-faith peers,
 *     puts it into a pToken (IPSEC_API_ATTR_iToken) and reads it back.
 */
#define _POSIX_C_SOURCE 200809L
#include "btns_example.h"

static int set_u16(const void *token, uint32_t attr, uint16_t v)
{
    return ipsec_set_token_attr(token, attr, sizeof v, &v);
}

int main(int argc, char **argv)
{
    unsigned char buf[65536];
    size_t n;
    FILE *f;
    ipsec_iToken_t t, tmpl, back;
    ipsec_pToken_t p;
    const char dn[] = "CN=forged";
    uint32_t len;
    void *raw;

    if (argc != 2) {
        fprintf(stderr, "usage: %s ITOKEN_FILE\n", argv[0]);
        return 2;
    }
    f = fopen(argv[1], "rb");
    if (f == NULL) {
        perror(argv[1]);
        return 1;
    }
    n = fread(buf, 1, sizeof buf, f);
    fclose(f);

    /* 1. import and print */
    t = ipsec_import_iToken(buf, (uint32_t)n);
    if (t == NULL) {
        printf("import: error %s (errno %d)\n", strerror(errno), errno);
        return 1;
    }
    printf("import: %u bytes\n", (unsigned)n);
    ex_print_itoken("", t);

    /* 2. identity attributes cannot be changed */
    if (ipsec_set_token_attr(t, IPSEC_API_ATTR_certificateDN, sizeof dn, dn) == 0) {
        printf("set certificateDN: unexpectedly allowed\n");
        return 1;
    }
    printf("set certificateDN: %s (errno %d)\n", strerror(errno), errno);
    ipsec_free_iToken(t);

    /* 3. a template: BTNS or leap of faith, never a pre-shared key */
    tmpl = ipsec_create_iToken();
    p = ipsec_create_pToken();
    if (tmpl == NULL || p == NULL) {
        perror("create");
        return 1;
    }
    if (set_u16(tmpl, IPSEC_API_ATTR_authMeth_BTNS, IPSEC_API_ATTR_ENABLE) != 0 ||
        set_u16(tmpl, IPSEC_API_ATTR_authMeth_LEAPOFFFAITH, IPSEC_API_ATTR_ENABLE) != 0 ||
        set_u16(tmpl, IPSEC_API_ATTR_authMeth_PRESHAREDKEY, IPSEC_API_ATTR_DISABLE) != 0) {
        perror("ipsec_set_token_attr");
        return 1;
    }
    len = 0;
    if (ipsec_export_iToken(tmpl, &len, NULL) == 0 || errno != ERANGE) {
        perror("ipsec_export_iToken (size)");
        return 1;
    }
    raw = malloc(len);
    if (raw == NULL || ipsec_export_iToken(tmpl, &len, raw) != 0 ||
        ipsec_set_token_attr(p, IPSEC_API_ATTR_iToken, len, raw) != 0) {
        perror("ipsec_export_iToken / ipsec_set_token_attr(iToken)");
        return 1;
    }
    free(raw);
    back = ex_itoken_of(p, IPSEC_API_ATTR_iToken, NULL, NULL);
    if (back == NULL) {
        perror("read back");
        return 1;
    }
    printf("template: %u bytes\n", (unsigned)len);
    ex_print_itoken("template.", back);
    ipsec_free_iToken(back);
    ipsec_free_iToken(tmpl);
    ipsec_free_pToken(p);
    return 0;
}
