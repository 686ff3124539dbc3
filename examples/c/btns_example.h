/*
 * btns_example.h - printing helpers shared by the C examples (not part of the library).
 *
 * Each attribute is printed as one "name: value" line, so tests can parse the output.
 */
#ifndef BTNS_EXAMPLE_H
#define BTNS_EXAMPLE_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ipsec_api.h>

static inline const char *ex_setting_name(unsigned v)
{
    switch (v) {
    case IPSEC_API_ATTR_DISABLE: return "DISABLE";
    case IPSEC_API_ATTR_ENABLE: return "ENABLE";
    case IPSEC_API_ATTR_ANY: return "ANY";
    case IPSEC_API_ATTR_LEVEL_LOW: return "LEVEL_LOW";
    case IPSEC_API_ATTR_LEVEL_MEDIUM: return "LEVEL_MEDIUM";
    case IPSEC_API_ATTR_LEVEL_HIGH: return "LEVEL_HIGH";
    default: return "?";
    }
}

static const struct { unsigned attr; const char *name; } ex_methods[] = {
    {IPSEC_API_ATTR_authMeth_NONE, "NONE"},
    {IPSEC_API_ATTR_authMeth_BTNS, "BTNS"},
    {IPSEC_API_ATTR_authMeth_LEAPOFFFAITH, "LEAPOFFAITH"},
    {IPSEC_API_ATTR_authMeth_PRESHAREDKEY, "PRESHAREDKEY"},
    {IPSEC_API_ATTR_authMeth_GROUPKEY, "GROUPKEY"},
    {IPSEC_API_ATTR_authMeth_XAUTH, "XAUTH"},
    {IPSEC_API_ATTR_authMeth_EAP, "EAP"},
    {IPSEC_API_ATTR_authMeth_PKIX_TRUSTED, "PKIX_TRUSTED"},
    {IPSEC_API_ATTR_authMeth_PKIX_INLINE, "PKIX_INLINE"},
    {IPSEC_API_ATTR_authMeth_PKIX_OFFLINE, "PKIX_OFFLINE"},
};

static inline const char *ex_method_name(unsigned v)
{
    size_t i;
    for (i = 0; i < sizeof ex_methods / sizeof ex_methods[0]; i++)
        if (ex_methods[i].attr == v)
            return ex_methods[i].name;
    return "?";
}

/* Any attribute, into a malloc'ed buffer: ask for the size (ERANGE), then get it. */
static inline void *ex_get_alloc(const void *token, uint32_t attr, uint32_t *len)
{
    void *buf;

    *len = 0;
    if (ipsec_get_token_attr(token, attr, len, NULL) == 0)
        return calloc(1, 1); /* empty value */
    if (errno != ERANGE)
        return NULL;
    buf = malloc(*len);
    if (buf == NULL)
        return NULL;
    if (ipsec_get_token_attr(token, attr, len, buf) != 0) {
        free(buf);
        return NULL;
    }
    return buf;
}

static inline void ex_print_u16(const char *prefix, const void *token, uint32_t attr, const char *name)
{
    uint16_t v = 0;
    uint32_t len = sizeof v;

    if (ipsec_get_token_attr(token, attr, &len, &v) == 0)
        printf("%s%s: %s (%u)\n", prefix, name, ex_setting_name(v), (unsigned)v);
    else
        printf("%s%s: error %s\n", prefix, name, strerror(errno));
}

static inline void ex_print_string(const char *prefix, const void *token, uint32_t attr, const char *name)
{
    uint32_t len;
    char *s = ex_get_alloc(token, attr, &len);

    if (s != NULL)
        printf("%s%s: %s\n", prefix, name, s);
    else
        printf("%s%s: (none: %s)\n", prefix, name, strerror(errno));
    free(s);
}

static inline void ex_print_itoken(const char *prefix, ipsec_iToken_t t)
{
    uint16_t method = 0;
    uint32_t len = sizeof method, i;
    unsigned char *key;
    size_t m;

    if (ipsec_get_token_attr(t, IPSEC_API_ATTR_authenticationMethod, &len, &method) == 0)
        printf("%sauthenticationMethod: %s (%u)\n", prefix, ex_method_name(method), (unsigned)method);
    else
        printf("%sauthenticationMethod: (none: %s)\n", prefix, strerror(errno));
    ex_print_string(prefix, t, IPSEC_API_ATTR_certificateDN, "certificateDN");
    ex_print_string(prefix, t, IPSEC_API_ATTR_certificateAuthorityDN, "certificateAuthorityDN");
    ex_print_string(prefix, t, IPSEC_API_ATTR_channelBinding, "channelBinding");
    ex_print_string(prefix, t, IPSEC_API_ATTR_auditString, "auditString");
    key = ex_get_alloc(t, IPSEC_API_ATTR_pubKeyID, &len);
    if (key != NULL) {
        printf("%spubKeyID: %u bytes ", prefix, (unsigned)len);
        for (i = 0; i < len; i++)
            printf("%02x", key[i]);
        printf("\n");
        free(key);
    } else {
        printf("%spubKeyID: (none: %s)\n", prefix, strerror(errno));
    }
    for (m = 0; m < sizeof ex_methods / sizeof ex_methods[0]; m++) {
        char name[64];
        snprintf(name, sizeof name, "authMeth_%s", ex_methods[m].name);
        ex_print_u16(prefix, t, ex_methods[m].attr, name);
    }
}

/* The iToken object of a pToken attribute (IPSEC_API_ATTR_iToken / _remote_iToken):
 * the attribute is the serialized iToken; ipsec_import_iToken makes the object. */
static inline ipsec_iToken_t ex_itoken_of(ipsec_pToken_t p, uint32_t attr, void **raw, uint32_t *raw_len)
{
    ipsec_iToken_t t;
    uint32_t len = 0;
    void *buf = ex_get_alloc(p, attr, &len);

    if (raw_len != NULL)
        *raw_len = len;
    if (buf == NULL)
        return NULL;
    t = ipsec_import_iToken(buf, len);
    if (raw != NULL)
        *raw = buf;
    else
        free(buf);
    return t;
}

static inline void ex_print_ptoken(ipsec_pToken_t p)
{
    static const struct { uint32_t attr; const char *name; } nums[] = {
        {IPSEC_API_ATTR_privacyProtected, "privacyProtected"},
        {IPSEC_API_ATTR_integrityProtected, "integrityProtected"},
        {IPSEC_API_ATTR_compressionAvailable, "compressionAvailable"},
        {IPSEC_API_ATTR_tunnelMode, "tunnelMode"},
        {IPSEC_API_ATTR_ipoptionsProtected, "ipoptionsProtected"},
    };
    size_t i;
    ipsec_iToken_t t;

    for (i = 0; i < sizeof nums / sizeof nums[0]; i++)
        ex_print_u16("", p, nums[i].attr, nums[i].name);
    ex_print_string("", p, IPSEC_API_ATTR_policyName, "policyName");
    ex_print_string("", p, IPSEC_API_ATTR_auditString, "auditString");
    ex_print_string("", p, IPSEC_API_ATTR_informationString, "informationString");
    t = ex_itoken_of(p, IPSEC_API_ATTR_iToken, NULL, NULL);
    if (t != NULL) {
        ex_print_itoken("iToken.", t);
        ipsec_free_iToken(t);
    } else {
        printf("iToken: (none: %s)\n", strerror(errno));
    }
    t = ex_itoken_of(p, IPSEC_API_ATTR_remote_iToken, NULL, NULL);
    if (t != NULL) {
        ex_print_itoken("remote_iToken.", t);
        ipsec_free_iToken(t);
    } else {
        printf("remote_iToken: (none: %s)\n", strerror(errno));
    }
}

#endif
